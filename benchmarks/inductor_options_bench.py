"""Compiled `run_with_cache` with fxlens's CPU inductor options against inductor's defaults (CPU).

    .venv/bin/python benchmarks/inductor_options_bench.py [--models tiny,gpt2-small,smollm2]
                                                          [--batch 4] [--seq 128] [--reps 10]
                                                          [--threads N] [--json out.json]

Two compiled copies of one model, interleaved round-robin by `bench.run_phase`
(medians; each result dropped as soon as the call returns), HF's eager forward
as the baseline in the same run:

  HF eager                  the HF model (sdpa attention)
  fxlens options            `.compile()`: fxlens.runtime.compiled.CPU_PATCHES
                            (`realize_opcount_threshold` 8: a value with several
                            readers is computed once)
  inductor defaults         `.compile(options={"realize_opcount_threshold": None})`:
                            inductor's own CPU threshold (50), which inlines the
                            attention mask into every layer's explicit softmax

Each fxlens variant runs `run_with_cache()` of every default site (the pattern
kept explicit, where the mask is read by every layer).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: run_phase, load_hf, machine, arguments, run_models)


def bench_options(which: str, batch: int, seq: int, reps: int) -> dict:
    import torch

    import fxlens

    hf, hf_copy, label = bench.load_hf(which)
    ours = fxlens.from_pretrained_no_processing(hf_copy, self_check=False).compile()
    default = fxlens.from_pretrained_no_processing(copy.deepcopy(hf_copy), self_check=False).compile(
        options={"realize_opcount_threshold": None})
    vocab = ours.cfg.d_vocab
    ids = torch.randint(10, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    variants = {"HF eager": lambda: hf(ids),
                "fxlens options": lambda: ours.run_with_cache(ids),
                "inductor defaults": lambda: default.run_with_cache(ids)}
    timed = bench.run_phase(variants, reps, warmup=2, peak=lambda fn: 0.0)
    base = timed["HF eager"]["median_s"]
    return {"model": which, "label": label, "batch": batch, "seq": seq, "reps": reps,
            "variants": {name: {**r, "vs_hf": r["median_s"] / base} for name, r in timed.items()}}


def table(result: dict) -> str:
    r = result
    lines = [f"### {r['model']}: {r['label']}",
             f"batch {r['batch']} x seq {r['seq']}, {r['reps']} reps (medians); compiled run_with_cache of "
             f"every default site", "",
             "| variant | median ms | x HF eager | first-call s |", "|---|---:|---:|---:|"]
    for name, v in r["variants"].items():
        lines.append(f"| {name} | {1e3 * v['median_s']:.2f} | {v['vs_hf']:.2f} | {v['first_s']:.1f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = bench.arguments(__doc__, "tiny,gpt2-small,smollm2", 4, 128, 10)
    args = ap.parse_args(argv)
    bench.run_models(args, lambda which, batch, seq, reps, _tl: bench_options(which, batch, seq, reps), table)


if __name__ == "__main__":
    main()
