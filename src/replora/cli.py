"""The `replora` command line."""
from __future__ import annotations

import argparse
import sys
import time

from .config import METHODS


def demo(args: argparse.Namespace) -> int:
    """Adapt the packaged MiniLM with each method; check it starts as the base model and merges exactly."""
    import torch
    import transformers
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import replora
    from .assets import minilm_path

    transformers.logging.set_verbosity_error()  # the new classifier head is expected, not news
    transformers.utils.logging.disable_progress_bar()
    path = str(minilm_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer(["A gripping, beautifully acted film.", "Dull, overlong and instantly forgettable."],
                      return_tensors="pt", padding=True)
    print(f"model: all-MiniLM-L6-v2 ({path}); r={args.r}, targets query/value, classifier trained in full")
    print(f"{'method':<9} {'trainable':>10} {'of total':>11} {'%':>6} {'init == base':>13} {'merged == unmerged':>19}")
    for method in METHODS:
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).eval()
        config = replora.AdapterConfig(method=method, r=args.r, lora_alpha=2 * args.r, modules_to_save=["classifier"])
        start = time.perf_counter()
        with torch.no_grad():
            base = model(**batch).logits
            replora.inject(model, config)
            init_ok = torch.allclose(model(**batch).logits, base, atol=1e-6)
            for p in model.parameters():  # move every adapter off its init, as training would
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 1e-2)
            unmerged = model(**batch).logits
            replora.merge(model)
            merge_ok = torch.allclose(model(**batch).logits, unmerged, atol=1e-5)
        trainable, total = replora.count_parameters(model)
        print(f"{method:<9} {trainable:>10,} {total:>11,} {100 * trainable / total:>6.2f} {_yes(init_ok):>13} "
              f"{_yes(merge_ok):>19}   ({time.perf_counter() - start:.2f} s)")
    return 0


def _yes(ok: bool) -> str:
    return "yes" if ok else "NO"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="replora", description="RepLoRA, MoSLoRA, LoRA and DoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="adapt the packaged MiniLM with every method and print parameter counts")
    p.add_argument("--r", type=int, default=8, help="adapter rank (default 8)")
    p.set_defaults(func=demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
