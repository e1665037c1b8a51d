#!/usr/bin/env bash
# Fill .gpu/ (ignored) with what the lent H200 lacks: wheels of this project's
# dependencies that its image does not hold (versions as installed here) and the
# offline data. Name ".gpu" in the device call's carry, and run
# scripts/device_checks.sh there. ~33 MB of the 64 MiB that travel per call.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .gpu/whl .gpu/data
version() { python3 -c "import importlib.metadata as m; print(m.version('$1'))"; }
packages=()
for name in llmcompressor compressed-tensors loguru hydra-core omegaconf gguf datasets \
  dill multiprocess pydantic pydantic-core annotated-types typing-inspection \
  hydra-joblib-launcher hydra-submitit-launcher submitit; do
  packages+=("$name==$(version "$name")")
done
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .gpu/whl "${packages[@]}"
# only a source distribution exists on PyPI: build its (pure Python) wheel here
python3 -m pip wheel -q --no-deps -w .gpu/whl \
  "antlr4-python3-runtime==$(version antlr4-python3-runtime)"
cp -r ../shared/data/brown ../shared/data/wikitext-2-raw \
  ../shared/data/imagenet-sample ../shared/data/README.md .gpu/data/
du -sh .gpu
