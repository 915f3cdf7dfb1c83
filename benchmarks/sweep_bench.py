"""Sweeps: activation patching and head ablation, compiled vs eager fxlens vs
TransformerLens, in one run (CPU; issue 16).

    .venv/bin/python benchmarks/sweep_bench.py [--models tiny,gpt2-small,smollm2]
                                               [--batch 1] [--seq 16] [--reps 3]
                                               [--threads N] [--json out.json]

Models as in benchmarks/bench.py (`load_hf`, `tl_from_hf`: the same weights in
all three). Two sweeps per model, each a variant callable that runs the whole
sweep and reads one number per step (`.item()`, as a researcher's loop does):

  patching   clean and corrupted token ids; for every layer L and position p,
             `blocks.L.hook_resid_pre` of the corrupted run gets the clean
             activation at p (a new `functools.partial(patch, pos=p,
             clean_act=...)` per step); the step's number is a logit difference
             at the last position
  heads      for every layer L and head h, `blocks.L.attn.hook_z` head h
             zeroed (a new partial per step); the same logit difference

Each sweep times fxlens compiled (`model.compile()`: hooks run in Python
between compiled segments), the same with `reuse_prefix=True` (opt-in: the
work before the first hook is reused while the tokens and weights are
unchanged, `fxlens.runtime.prefix`), fxlens eager (the same model, runner off) and
TransformerLens 3.9, interleaved with `bench.run_phase` (rotating start, medians
over --reps). "first s" is the first sweep, which includes every compilation
(a cold inductor cache: a fresh TORCHINDUCTOR_CACHE_DIR); "compilations" and
"compile s" are the compiled runner's counts over the sweep. The numbers of the
three variants are compared (max |difference|) so a fast wrong answer shows.
Benchmarks are not tests.
"""

from __future__ import annotations

import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: run_phase, load_hf, tl_from_hf, machine)


def patch(x, hook, pos, clean_act):
    x[:, pos] = clean_act[:, pos]
    return x


def ablate(z, hook, head):
    z[:, :, head] = 0.0
    return z


def spread(steps: list, max_steps: int) -> list:
    """`max_steps` of `steps` evenly spread over the list (all of them if 0)."""
    if not max_steps or max_steps >= len(steps):
        return steps
    if max_steps == 1:
        return steps[:1]
    return [steps[round(i * (len(steps) - 1) / (max_steps - 1))] for i in range(max_steps)]


def sweeps(fx, tl, tokens, corrupt, answer: tuple[int, int], max_steps: int = 0):
    """{sweep name: {variant name: callable running the sweep}}, the numbers each
    variant's last sweep read ({sweep: {variant: [float]}}) and the steps of each
    sweep ((site, position) / (layer, head); `max_steps` of them, spread, if set)."""
    import torch

    n_layers, n_heads, seq = fx.cfg.n_layers, fx.cfg.n_heads, tokens.shape[1]
    good, bad = answer
    sites = [f"blocks.{L}.hook_resid_pre" for L in range(n_layers)]
    with torch.inference_mode():
        _, fx_clean = fx.run_with_cache(tokens, names_filter=sites)
        fx_clean = {n: fx_clean[n].clone() for n in sites}
        tl_clean = None
        if tl is not None:
            _, cache = tl.run_with_cache(tokens, names_filter=lambda n: n in sites)
            tl_clean = {n: cache[n].clone() for n in sites}

    def metric(logits) -> float:
        return (logits[:, -1, good] - logits[:, -1, bad]).mean().item()

    readings: dict = {"patching": {}, "heads": {}}
    steps = {"patching": spread([(s, p) for s in sites for p in range(seq)], max_steps),
             "heads": spread([(L, h) for L in range(n_layers) for h in range(n_heads)], max_steps)}

    def patching(run, clean, label):
        def sweep():
            out = [metric(run(corrupt, [(s, functools.partial(patch, pos=p, clean_act=clean[s]))]))
                   for s, p in steps["patching"]]
            readings["patching"][label] = out
        return sweep

    def heads(run, label):
        def sweep():
            out = [metric(run(corrupt, [(f"blocks.{L}.attn.hook_z", functools.partial(ablate, head=h))]))
                   for L, h in steps["heads"]]
            readings["heads"][label] = out
        return sweep

    runner = fx._compiled

    from fxlens.runtime.compiled import CompiledRunner
    reuse = CompiledRunner(fx, reuse_prefix=True)      # the same segments, the prefix reused (opt-in)

    def run_with(this):
        """run_with_hooks with the model's runner set to `this` (None: eager) for the call."""
        def run(toks, hooks):
            fx._compiled = this
            try:
                return fx.run_with_hooks(toks, fwd_hooks=hooks)
            finally:
                fx._compiled = runner
        return run

    fx_run, fx_reuse_run, fx_eager_run = run_with(runner), run_with(reuse), run_with(None)

    out = {"patching": {"fxlens compiled": patching(fx_run, fx_clean, "fxlens compiled"),
                        "fxlens compiled, reuse_prefix": patching(fx_reuse_run, fx_clean,
                                                                  "fxlens compiled, reuse_prefix"),
                        "fxlens eager": patching(fx_eager_run, fx_clean, "fxlens eager")},
           "heads": {"fxlens compiled": heads(fx_run, "fxlens compiled"),
                     "fxlens compiled, reuse_prefix": heads(fx_reuse_run, "fxlens compiled, reuse_prefix"),
                     "fxlens eager": heads(fx_eager_run, "fxlens eager")}}
    if tl is not None:
        def tl_run(toks, hooks):
            return tl.run_with_hooks(toks, fwd_hooks=hooks)

        out["patching"]["TransformerLens"] = patching(tl_run, tl_clean, "TransformerLens")
        out["heads"]["TransformerLens"] = heads(tl_run, "TransformerLens")
    return out, readings, steps


def bench_model(which: str, batch: int, seq: int, reps: int, with_tl: bool, max_steps: int = 0) -> dict:
    import torch

    import fxlens

    hf, hf_copy, label = bench.load_hf(which)
    vocab = hf.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq), generator=gen)
    corrupt = tokens.clone()
    corrupt[:, : max(1, seq // 2)] = torch.randint(0, vocab, (batch, max(1, seq // 2)), generator=gen)
    answer = (int(torch.randint(0, vocab, (1,), generator=gen)), int(torch.randint(0, vocab, (1,), generator=gen)))
    fx = fxlens.from_pretrained_no_processing(hf_copy, self_check=False).compile()
    tl = bench.tl_or_none(hf_copy, which, with_tl)
    del hf
    variants, readings, sweep_steps = sweeps(fx, tl, tokens, corrupt, answer, max_steps)
    result = {"model": which, "label": label, "batch": batch, "seq": seq,
              "n_layers": fx.cfg.n_layers, "n_heads": fx.cfg.n_heads, "sweeps": {}}
    for name, phase in variants.items():
        steps = len(sweep_steps[name])
        full = fx.cfg.n_layers * (seq if name == "patching" else fx.cfg.n_heads)
        print(f"[{which}] {name}: {len(phase)} variants x {steps} steps", file=sys.stderr, flush=True)
        before = fx.compile_stats()
        start = time.perf_counter()
        times = bench.run_phase(phase, reps, warmup=1, peak=lambda fn: float("nan"))
        after = fx.compile_stats()
        ref = readings[name]["fxlens eager"]
        agree = {v: max(abs(a - b) for a, b in zip(r, ref)) for v, r in readings[name].items()}
        result["sweeps"][name] = {
            "steps": steps, "full_steps": full, "wall_s": time.perf_counter() - start, "times": times, "max_abs_diff_vs_eager": agree,
            "metric_spread": statistics.pstdev(ref),
            "compilations": after["compilations"] - before["compilations"],
            "compile_s": after["compile_seconds"] - before["compile_seconds"],
            "variants_added": after["variants"] - before["variants"], "segments": after.get("segments")}
    result["compile_stats"] = fx.compile_stats()
    return result


def full_sweep_s(t: dict, steps: int, full: int) -> float:
    """Seconds for the whole sweep including compiling: the first sweep's extra time
    (compilation) plus the per-step median times every step (a projection when only
    `steps` of `full` ran)."""
    return (t["first_s"] - t["median_s"]) + t["median_s"] * full / steps


def table(r: dict) -> str:
    lines = [f"### {r['model']}: {r['label']}",
             f"batch {r['batch']} x seq {r['seq']}; {r['n_layers']} layers, {r['n_heads']} heads", "",
             "| sweep | variant | steps (of) | median s | ms/step | first s (incl. compile) | "
             "full sweep s incl. compile | x fxlens eager | x TL | x eager per step | compilations | compile s | "
             "max abs diff |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s in r["sweeps"].items():
        steps, full = s["steps"], s.get("full_steps", s["steps"])
        whole = {v: full_sweep_s(t, steps, full) for v, t in s["times"].items()}
        eager, tl = whole["fxlens eager"], whole.get("TransformerLens")
        for v, t in s["times"].items():
            comp = v == "fxlens compiled"
            x_tl = f"{whole[v] / tl:.2f}" if tl else ""
            n_comp = str(s["compilations"]) if comp else ""
            comp_s = f"{s['compile_s']:.1f}" if comp else ""
            proj = "" if steps == full else " (projected)"
            lines.append(
                f"| {name} | {v} | {steps} ({full}) | {t['median_s']:.2f} | {1e3 * t['median_s'] / steps:.1f} | "
                f"{t['first_s']:.2f} | {whole[v]:.1f}{proj} | {whole[v] / eager:.2f} | {x_tl} | "
                f"{t['median_s'] / s['times']['fxlens eager']['median_s']:.2f} | "
                f"{n_comp} | {comp_s} | {s['max_abs_diff_vs_eager'][v]:.1e} |")
    stats = {k: v for k, v in r["compile_stats"].items() if k != "fused_attention"}
    lines.append(f"\ncompile_stats (whole run, incl. the clean run_with_cache): {json.dumps(stats)}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = bench.arguments(__doc__, "tiny,gpt2-small", 1, 16, 3)
    ap.add_argument("--max-steps", type=int, default=0,
                    help="time this many steps of each sweep, spread over it (0: every step); "
                         "per-step costs at shapes where a whole sweep takes too long")
    args = ap.parse_args(argv)
    bench.run_models(args, functools.partial(bench_model, max_steps=args.max_steps), table)


if __name__ == "__main__":
    main()
