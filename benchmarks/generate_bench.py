"""Time greedy generation: HF `generate` against fxlens's, in one run (CPU).

    .venv/bin/python benchmarks/generate_bench.py [--models smollm2] [--batch 1] [--seq 64]
                                                  [--new 32] [--reps 5] [--threads N]
                                                  [--json out.json] [--warm-inductor-cache]

Variants, interleaved round-robin by `bench.run_phase` (medians; each result
dropped as soon as the call returns), on one prompt of `--seq` random token ids
(fixed seed) and `--new` greedy tokens:

  HF generate              `hf.generate(do_sample=False)` (sdpa attention, HF's KV cache)
  fxlens eager             `generate(do_sample=False, use_past_kv_cache=True)`: the
                           prompt through the prefill graph, then the decode graph
  fxlens eager, 1 hook     the same with one editing hook, + 0 on the middle layer's
                           hook_resid_post at every call
  fxlens compiled          `.compile()` (inductor): the prefill and decode graphs cut into
                           segments at block boundaries, equal blocks compiled once
  fxlens compiled, 1 hook  the same with the editing hook (it runs in Python between
                           segments: the hooked site is a block boundary, nothing recompiles)

Before timing, each variant runs once and its tokens are checked equal to HF's
(the script fails otherwise); that first call of the compiled model compiles
the prefill and decode graphs: "first-call s" is its time, "compile s" that
minus the variant's median (a fresh inductor cache unless --warm-inductor-cache).
Ratios are each median over HF generate's median in the same run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: run_phase, load_hf, machine, arguments, run_models)


def bench_generate(which: str, batch: int, seq: int, reps: int, new: int) -> dict:
    import torch

    import fxlens

    hf, hf_copy, label = bench.load_hf(which)
    start = time.perf_counter()
    eager = fxlens.from_pretrained_no_processing(hf_copy, self_check=False)
    capture_s = time.perf_counter() - start
    compiled = fxlens.from_pretrained_no_processing(bench.load_hf(which)[1], self_check=False).compile()
    ids = torch.randint(10, eager.cfg.d_vocab, (batch, seq), generator=torch.Generator().manual_seed(0))
    site = f"blocks.{eager.cfg.n_layers // 2}.hook_resid_post"
    zero = torch.zeros(eager.cfg.d_model)

    def edit(resid, hook):            # [batch, pos, d_model]: an edit that keeps HF's tokens
        return resid + zero

    def fx_gen(model, **kw):
        return lambda: model.generate(ids, max_new_tokens=new, do_sample=False, stop_at_eos=False,
                                      verbose=False, **kw)

    variants = {
        "HF generate": lambda: hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                                           min_new_tokens=new, do_sample=False, eos_token_id=None,
                                           pad_token_id=0),
        "fxlens eager": fx_gen(eager),
        "fxlens eager, 1 hook": fx_gen(eager, fwd_hooks=[(site, edit)]),
        "fxlens compiled": fx_gen(compiled),
        "fxlens compiled, 1 hook": fx_gen(compiled, fwd_hooks=[(site, edit)]),
    }
    first, tokens = {}, {}
    with torch.inference_mode():
        for name, fn in variants.items():
            t0 = time.perf_counter()
            tokens[name] = fn()
            first[name] = time.perf_counter() - t0
    want = tokens["HF generate"]
    for name, got in tokens.items():
        if got.shape != want.shape or not torch.equal(got, want):
            raise SystemExit(f"{name}: tokens differ from HF generate's")
    timed = bench.run_phase(variants, reps, warmup=1, peak=lambda fn: 0.0)
    for name, r in timed.items():
        r["first_call_s"] = first[name]
    hf_s = timed["HF generate"]["median_s"]
    return {"model": which, "label": label, "batch": batch, "seq": seq, "new": new, "reps": reps,
            "capture_s": capture_s, "hooked_site": site, "tokens_identical": True,
            "compile_stats": compiled.compile_stats(),
            "variants": {name: {**r, "vs_hf": r["median_s"] / hf_s} for name, r in timed.items()}}


def table(result: dict) -> str:
    r = result
    lines = [f"### {r['model']}: {r['label']}",
             f"batch {r['batch']}, {r['seq']}-token prompt + {r['new']} greedy tokens, {r['reps']} reps "
             f"(medians); tokens identical to HF: {r['tokens_identical']}; capture {r['capture_s']:.1f} s; "
             f"graphs compiled: {r['compile_stats'].get('compilations')}",
             "",
             "| variant | median s | min s | x HF generate | first-call s | compile s |",
             "|---|---|---|---|---|---|"]
    for name, v in r["variants"].items():
        compile_s = f"{v['first_call_s'] - v['median_s']:.1f}" if name.startswith("fxlens compiled") else ""
        lines.append(f"| {name} | {v['median_s']:.3f} | {v['min_s']:.3f} | {v['vs_hf']:.2f} | "
                     f"{v['first_call_s']:.2f} | {compile_s} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = bench.arguments(__doc__, "smollm2", 1, 64, 5)
    ap.add_argument("--new", type=int, default=32, help="greedy tokens to generate")
    args = ap.parse_args(argv)
    bench.run_models(args, lambda which, batch, seq, reps, _tl: bench_generate(which, batch, seq, reps, args.new),
                     table)


if __name__ == "__main__":
    main()
