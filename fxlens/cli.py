"""The fxlens command line."""

from __future__ import annotations

import argparse
import sys

import torch


def _summary(cache, limit: int = 12) -> str:
    lines = [f"{len(cache)} cached activations:"]
    items = list(cache.items())
    show = items[:limit // 2] + [None] + items[-limit // 2:] if len(items) > limit else items
    for item in show:
        if item is None:
            lines.append(f"  ... {len(items) - limit} more ...")
            continue
        name, t = item
        lines.append(f"  {name:40s} {str(tuple(t.shape)):22s} mean {t.float().mean():+.4f}  "
                     f"std {t.float().std():.4f}" if torch.isfinite(t).all() else
                     f"  {name:40s} {str(tuple(t.shape)):22s} (masked)")
    return "\n".join(lines)


def cmd_smollm2(args) -> int:
    from .checkpoints import load_smollm2

    print("loading SmolLM2-135M-Instruct (GGUF, dequantised to float32) and instrumenting it ...",
          flush=True)
    model = load_smollm2()
    print(model)
    logits, cache = model.run_with_cache(args.prompt)
    probs = logits[0, -1].softmax(-1)
    top = probs.topk(args.top_k)
    print(f"\nprompt: {args.prompt!r}\ntop {args.top_k} next tokens:")
    for p, i in zip(top.values, top.indices):
        print(f"  {model.to_string(i)!r:16s} {p.item():.3f}")
    print()
    print(_summary(cache))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fxlens", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("smollm2", help="instrument SmolLM2-135M-Instruct and show predictions and activations")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(fn=cmd_smollm2)
    args = parser.parse_args(argv)
    from .errors import FxlensError

    try:
        return args.fn(args)
    except FxlensError as exc:
        print(f"fxlens: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
