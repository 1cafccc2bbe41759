#!/usr/bin/env bash
# The first real generative runs (issue 15's closing note): SmolLM2-135M fine-tuned on a 2,000-item
# stratified mix of the eight commonsense training sets, LoRA and RepLoRA (r = 8, q/v, lr 1e-3, one
# epoch, seed 0), then each adapter and the base model scored on the eight test sets (25 items each,
# the same items for every model) by generation and by log-likelihood. Resumable: finished steps skip.
set -euo pipefail
cd "$(dirname "$0")/.."
R=research/results/commonsense-pilot
mkdir -p "$R"
for method in lora replora; do
  [ -f "$R/$method-s0/metrics.json" ] || .venv/bin/replora train --dataset commonsense --method "$method" \
    --max-train-examples 2000 --epochs 1 --batch-size 8 --max-length 192 --lr 1e-3 --seed 0 \
    --max-eval-examples 16 --max-new-tokens 8 --output "$R/$method-s0" --resume
  for scoring in generate loglik; do
    [ -f "$R/$method-s0/eval-$scoring/eval.json" ] || .venv/bin/replora eval --adapter "$R/$method-s0" \
      --scoring "$scoring" --max-eval-examples 25 --max-new-tokens 8 --output "$R/$method-s0/eval-$scoring"
  done
  if [ "$method" = lora ]; then  # the base model's own rows, once the first adapter is done
    for scoring in generate loglik; do
      [ -f "$R/base/eval-$scoring/eval.json" ] || .venv/bin/replora eval --model smollm2 --scoring "$scoring" \
        --max-eval-examples 25 --max-new-tokens 8 --max-length 192 --output "$R/base/eval-$scoring"
    done
  fi
done
