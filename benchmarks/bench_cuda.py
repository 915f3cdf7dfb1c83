"""GPU benchmark (issue 15): HF vs fxlens vs TransformerLens in bf16, on CUDA.

    .venv/bin/python benchmarks/bench_cuda.py [--device cuda] [--dtype bfloat16]
        [--models smollm2,gpt2-small] [--shapes 32x512,1x128] [--reps 20]
        [--gen-prompt 64 --gen-new 128] [--no-tl] [--threads N] [--json out.json]

The same script runs end to end on CPU (`--device cpu`, small `--shapes` and
`--gen-new` so it finishes): that is how it is checked where no GPU is lent.

Per model and input shape, interleaved round-robin (the starting variant rotates
each rep), medians, every result dropped on return, ratios against HF in the
same run:
  HF eager (sdpa), HF `torch.compile`, fxlens compiled forward,
  fxlens compiled `run_with_cache` of the residual stream (resid_pre/mid/post),
  of every default site, with one editing hook (head 0 of the middle layer's
  hook_z zeroed), TransformerLens 3.9 `run_with_cache` of every default site.
Then greedy generation (`--gen-prompt` token prompt, exactly `--gen-new` new
tokens, no early stop): HF `generate` vs fxlens eager and compiled `generate`
with an editing hook on the middle layer's hook_resid_post.

Peak memory per variant: `torch.cuda.max_memory_allocated` over one extra call
(after `reset_peak_memory_stats`) on CUDA; resident-set growth on CPU.
GPU timings synchronise before and after each call.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the CPU benchmark: model loading, TransformerLens construction, machine line)


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def peak_memory_mb(fn, device: str) -> float:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return bench.peak_rss_growth(fn)


def run_phase(variants: dict, reps: int, device: str, warmup: int = 2) -> dict:
    """bench.run_phase with GPU synchronisation and GPU peak memory."""
    return bench.run_phase(variants, reps, warmup, sync=lambda: _sync(device),
                           peak=lambda fn: peak_memory_mb(fn, device))


def load(which: str, device: str, dtype):
    """(HF model with sdpa attention, an independent copy for fxlens / TL, label)."""
    hf, _, label = bench.load_hf(which)
    hf = hf.to(device=device, dtype=dtype).eval()
    return hf, copy.deepcopy(hf), label


def forward_variants(hf, fx, tl, tokens) -> dict:
    import torch

    mid = fx.cfg.n_layers // 2

    def ablate(z, hook):                       # [batch, pos, head, d_head]: zero head 0
        z[:, :, 0] = 0.0
        return z

    edit = [(f"blocks.{mid}.attn.hook_z", ablate)]
    resid = [n for n in fx.hook_names if n.endswith(("hook_resid_pre", "hook_resid_mid", "hook_resid_post"))]
    hf_c = torch.compile(hf)
    v = {
        "HF eager": lambda: hf(tokens, use_cache=False),
        "HF compiled": lambda: hf_c(tokens, use_cache=False),
        "fxlens compiled forward": lambda: fx(tokens),
        "fxlens compiled run_with_cache resid": lambda: fx.run_with_cache(tokens, names_filter=resid),
        "fxlens compiled run_with_cache all": lambda: fx.run_with_cache(tokens),
        "fxlens compiled editing hook": lambda: fx.run_with_hooks(tokens, fwd_hooks=edit),
    }
    if tl is not None:
        v["TL run_with_cache all"] = lambda: tl.run_with_cache(tokens)
    return v


def generation_variants(hf, fx, prompt, new: int) -> dict:
    import torch

    mid = fx.cfg.n_layers // 2

    def steer(resid, hook):                    # a small edit, so the hook does real work
        return resid * 1.0001

    hooks = [(f"blocks.{mid}.hook_resid_post", steer)]

    def hf_gen():
        hf.generate(prompt, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                    pad_token_id=0, eos_token_id=None)

    def fx_gen(compiled: bool):
        runner = fx._compiled

        def call():
            fx._compiled = runner if compiled else None   # the same model, compiled runner off or on
            try:
                fx.generate(prompt, max_new_tokens=new, do_sample=False, stop_at_eos=False,
                            verbose=False, fwd_hooks=hooks)
            finally:
                fx._compiled = runner
        return call

    return {"HF generate": hf_gen, "fxlens eager generate + hook": fx_gen(False),
            "fxlens compiled generate + hook": fx_gen(True)}


def bench_model(which: str, shapes, reps: int, device: str, dtype, with_tl: bool,
                gen_prompt: int, gen_new: int) -> dict:
    import torch

    import fxlens

    hf, hf_copy, label = load(which, device, dtype)
    start = time.perf_counter()
    fx = fxlens.from_pretrained_no_processing(hf_copy, dtype=dtype, self_check=False, device=device)
    capture_s = time.perf_counter() - start
    fx.compile()
    tl = None
    if with_tl:
        try:
            tl = bench.tl_from_hf(copy.deepcopy(hf).float().cpu()).to(device=device, dtype=dtype)
        except Exception as exc:  # noqa: BLE001 - reported in the output
            print(f"  TransformerLens unavailable for {which}: {type(exc).__name__}: {exc}", file=sys.stderr)
    vocab = hf.config.vocab_size
    out = {"model": which, "label": label, "capture_s": capture_s, "forward": {}}
    for batch, seq in shapes:
        tokens = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(0)).to(device)
        print(f"[{which}] forward {batch}x{seq}", file=sys.stderr, flush=True)
        out["forward"][f"{batch}x{seq}"] = run_phase(forward_variants(hf, fx, tl, tokens), reps, device)
    prompt = torch.randint(0, vocab, (1, gen_prompt), generator=torch.Generator().manual_seed(1)).to(device)
    print(f"[{which}] generate {gen_prompt}+{gen_new}", file=sys.stderr, flush=True)
    out["generate"] = run_phase(generation_variants(hf, fx, prompt, gen_new), max(3, reps // 4), device,
                                warmup=1)
    out["compile_stats"] = fx.compile_stats()
    return out


def table(result: dict) -> str:
    lines = [f"### {result['model']}: {result['label']}",
             f"capture + passes {result['capture_s']:.2f} s; compile stats {result['compile_stats']}", "",
             "| run | variant | median ms | x HF eager | x HF compiled | first-call s | peak MB |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for shape, rows in result["forward"].items():
        eager, comp = rows["HF eager"]["median_s"], rows["HF compiled"]["median_s"]
        for name, r in rows.items():
            lines.append(f"| {shape} | {name} | {1e3 * r['median_s']:.2f} | {r['median_s'] / eager:.2f} | "
                         f"{r['median_s'] / comp:.2f} | {r['first_s']:.1f} | {r['peak_mb']:.0f} |")
    rows = result["generate"]
    hf_gen = rows["HF generate"]["median_s"]
    for name, r in rows.items():
        lines.append(f"| generate | {name} | {1e3 * r['median_s']:.1f} | {r['median_s'] / hf_gen:.2f} (x HF "
                     f"generate) | | {r['first_s']:.1f} | {r['peak_mb']:.0f} |")
    return "\n".join(lines)


def machine(device: str) -> str:
    import torch

    line = bench.machine()
    if device.startswith("cuda"):
        line += f"; GPU {torch.cuda.get_device_name()}, CUDA {torch.version.cuda}"
    return line


def main(argv=None) -> None:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else None,
                    help="cuda (the point of this script) or cpu (a smoke run)")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--models", default="smollm2,gpt2-small")
    ap.add_argument("--shapes", default="32x512,1x128", help="BATCHxSEQ,...")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--gen-prompt", type=int, default=64)
    ap.add_argument("--gen-new", type=int, default=128)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--no-tl", action="store_true", help="skip TransformerLens")
    ap.add_argument("--json", help="also write the raw numbers here")
    args = ap.parse_args(argv)
    if args.device is None:
        raise SystemExit("no CUDA device here: pass --device cpu for a smoke run on CPU")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {args.device}: torch {torch.__version__} sees no CUDA device")
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    dtype = getattr(torch, args.dtype)
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"machine: {machine(args.device)}; dtype {args.dtype}\n")
    results = []
    for which in args.models.split(","):
        r = bench_model(which, shapes, args.reps, args.device, dtype, not args.no_tl,
                        args.gen_prompt, args.gen_new)
        results.append(r)
        print(table(r) + "\n", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": machine(args.device), "args": vars(args),
                                               "results": results}, indent=1, default=str))


if __name__ == "__main__":
    main()
