"""Harvest throughput (tokens/s): `fxlens.harvest` against HF's compiled forward
on the same batches and TransformerLens 3.9 run_with_cache + the same writer,
and the 2-process data-parallel speedup under torchrun (CPU; issue 12.5).

    .venv/bin/python benchmarks/harvest_bench.py [--models tiny,gpt2-small,smollm2]
                                                 [--batch 4] [--seq 128] [--batches 8] [--reps 5]
                                                 [--threads N] [--no-tl] [--no-dp] [--json out.json]

Models as in benchmarks/bench.py (`load_hf`: the same weights for HF, fxlens and
TransformerLens). The corpus is synthetic (documents of words drawn from this
file's docstring, seeded), written once as plain text and packed into
`--batch * --batches` rows of `--seq` tokens by harvest's own `tokenize` /
`pack_rows`. The tiny and GPT-2-small models share tests/data/models/gpt2's
tokenizer (vocab 512: ids fit both, and a random-weight model's speed does not
depend on which ids it gets); SmolLM2 has its own.

Phase "harvest" interleaves, with `bench.run_phase` (rotating start, medians
over --reps, each result dropped on return):

  HF compiled forward        `torch.compile(hf)` on the packed batches (the ceiling)
  fxlens compiled forward    the instrumented graph, no hook
  fxlens run_with_cache      one site, return_type=None, on the packed batches
  tokenize + pack            harvest's tokenizer and packing over the corpus
  fxlens harvest (1 site)    `fxlens.harvest(model.compile(), corpus, [site])`: read,
                             tokenize, pack, forward, copy, write shards, index.json
  fxlens harvest (N sites)   the same with blocks.*.hook_resid_post
  TL harvest (1 / N sites)   the same harvest with the forward replaced by
                             TransformerLens's run_with_cache(names_filter=sites):
                             the same rows, copy and safetensors writer

A harvest writes to a fresh folder each call (the previous call's is removed
first). After the phase, the last shards of fxlens and TL are compared (max
|difference|) so a fast wrong answer shows.

Phase "data parallel": the same 1-site harvest run by `torchrun
--nproc-per-node K` of this script's worker (gloo, CPU): 1 process with 1
thread, 1 process with 2 threads, 2 processes with 1 thread each, launched in
that rotation for --dp-rounds. Each worker loads, compiles and warms up once,
then times --reps harvests between barriers (harvest ends with an all-gather),
one shard per batch so ranks alternate batches. The launches share the run's
inductor cache, so those after the first reuse its kernels. Benchmarks are not tests.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared helpers: run_phase, load_hf, tl_from_hf, machine, arguments)

TINY = bench.ROOT / "tests" / "data" / "models" / "gpt2"


# --- inputs -----------------------------------------------------------------------------
def load_tokenizer(which: str):
    from transformers import AutoTokenizer

    if which == "smollm2":
        from fxlens.tools.checkpoints import smollm2

        folder, gguf = smollm2()
        return AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    return AutoTokenizer.from_pretrained(TINY)


def write_corpus(path: Path, tokenizer, seq: int, rows: int, seed: int = 0) -> None:
    """Plain-text documents (one a line) of seeded random words: just enough for
    `rows` rows of `seq` tokens (one row more), so the harvest tokenizes about
    what it uses."""
    import torch

    words = __doc__.split()
    g = torch.Generator().manual_seed(seed)
    docs: list[str] = []
    tokens = 0
    while tokens < (rows + 1) * seq:         # + a BOS per document, as pack_rows adds
        n = int(torch.randint(5, 4 * seq, (1,), generator=g))
        docs.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)))
        tokens += len(tokenizer(docs[-1], add_special_tokens=False)["input_ids"]) + 1
    path.write_text("\n".join(docs) + "\n")


def packed_batches(path: Path, tokenizer, seq: int, batch: int, n_batches: int) -> list:
    """The first batch * n_batches rows the harvest reads, as [batch, seq] tensors."""
    import torch

    from fxlens.tools.harvesting import Corpus, pack_rows, tokenize

    rows = []
    for row in pack_rows(tokenize(Corpus(path), tokenizer), seq, tokenizer.bos_token_id):
        rows.append(row)
        if len(rows) == batch * n_batches:
            break
    tokens = torch.tensor(rows, dtype=torch.long)
    return list(tokens.split(batch))


def tl_forward(tl, sites: list[str]):
    """harvest's forward (tokens -> {site: activation}) through TransformerLens."""
    def forward(tokens):
        _, cache = tl.run_with_cache(tokens, names_filter=sites, return_type=None)
        return {s: cache[s] for s in sites}
    return forward


class Fresh:
    """A new output folder per call; the previous one is removed first (so the last
    stays for checking)."""

    def __init__(self, root: Path, label: str):
        self.root, self.label, self.n, self.last = root, label, 0, None

    def __call__(self) -> Path:
        if self.last is not None:
            shutil.rmtree(self.last, ignore_errors=True)
        self.n += 1
        self.last = self.root / f"{self.label}-{self.n}"
        return self.last


def max_diff(a: Path, b: Path, sites: list[str]) -> float:
    import torch

    from fxlens.tools.harvesting import load_shards

    _, x = load_shards(a)
    _, y = load_shards(b)
    if not torch.equal(x["tokens"], y["tokens"]):
        raise SystemExit(f"{a} and {b} hold different rows")
    return max(float((x[s] - y[s]).abs().max()) for s in sites)


# --- one model, one process ---------------------------------------------------------------
def bench_model(which: str, batch: int, seq: int, reps: int, with_tl: bool, n_batches: int = 8,
                dp: dict | None = None) -> dict:
    import torch

    import fxlens

    tok = load_tokenizer(which)
    hf, hf_copy, label = bench.load_hf(which)
    fx = fxlens.from_pretrained_no_processing(hf_copy, tokenizer=tok, self_check=False).compile()
    work = Path(tempfile.mkdtemp(prefix="fxlens_harvest_bench_"))
    corpus = work / "corpus.txt"
    write_corpus(corpus, tok, seq, batch * n_batches)
    batches = packed_batches(corpus, tok, seq, batch, n_batches)
    n_tokens = batch * n_batches * seq
    one = [f"blocks.{fx.cfg.n_layers // 2}.hook_resid_post"]
    every = [f"blocks.{i}.hook_resid_post" for i in range(fx.cfg.n_layers)]
    hf_c = torch.compile(hf)

    def harvest(sites, fresh, forward=None):
        def call():
            fxlens.harvest(fx, corpus, sites, out_dir=fresh(), seq_len=seq, batch_size=batch,
                           max_tokens=n_tokens, progress=False, _forward=forward)
        return call

    def over_batches(fn):
        def call():
            for b in batches:
                fn(b)                                   # each result dropped here
        return call

    def tokenize_pack():
        from fxlens.tools.harvesting import Corpus, pack_rows, tokenize

        rows = pack_rows(tokenize(Corpus(corpus), tok), seq, tok.bos_token_id)
        for _ in range(batch * n_batches):
            next(rows)

    folders = {k: Fresh(work, k) for k in ("fx1", "fxN", "tl1", "tlN")}
    variants = {
        "HF compiled forward": over_batches(lambda b: hf_c(b, use_cache=False)),
        "fxlens compiled forward": over_batches(lambda b: fx(b, return_type=None)),
        "fxlens run_with_cache (1 site)": over_batches(
            lambda b: fx.run_with_cache(b, names_filter=one, return_type=None)),
        "tokenize + pack": tokenize_pack,
        "fxlens harvest (1 site)": harvest(one, folders["fx1"]),
        f"fxlens harvest ({len(every)} sites)": harvest(every, folders["fxN"]),
    }
    tl = bench.tl_or_none(hf_copy, which, with_tl)
    if tl is not None:
        variants["TL harvest (1 site)"] = harvest(one, folders["tl1"], tl_forward(tl, one))
        variants[f"TL harvest ({len(every)} sites)"] = harvest(every, folders["tlN"], tl_forward(tl, every))
    print(f"[{which}] harvest phase: {len(variants)} variants, {n_tokens} tokens each", file=sys.stderr,
          flush=True)
    times = bench.run_phase(variants, reps, peak=lambda fn: float("nan"))
    agree = {}
    if tl is not None:
        agree = {"1 site": max_diff(folders["fx1"].last, folders["tl1"].last, one),
                 f"{len(every)} sites": max_diff(folders["fxN"].last, folders["tlN"].last, every)}
    result = {"model": which, "label": label, "batch": batch, "seq": seq, "batches": n_batches,
              "tokens": n_tokens, "sites": {"1": one, "N": len(every)}, "times": times,
              "max_abs_diff_fxlens_vs_tl": agree, "threads": torch.get_num_threads(),
              "loadavg": os.getloadavg()}
    print(table(result) + "\n", flush=True)          # before the long data-parallel launches
    if dp is not None:
        result["dp"] = data_parallel(which, corpus, one, batch, seq, n_batches, work, **dp)
    shutil.rmtree(work, ignore_errors=True)
    return result


# --- data parallel under torchrun -----------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def data_parallel(which, corpus: Path, sites, batch, seq, n_batches, work: Path, reps: int, rounds: int) -> dict:
    """Seconds per harvest for each (processes, threads per process), medians over
    every launch's reps; the launches rotate through the settings `rounds` times."""
    settings = [(1, 1), (1, 2), (2, 1)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}   # the launches share this run's inductor cache
    runs: dict[str, list[float]] = {f"{p} proc x {t} thread": [] for p, t in settings}
    per_rank: dict[str, list] = {k: [] for k in runs}
    for r in range(rounds):
        for p, t in settings[r % 3:] + settings[:r % 3]:
            key = f"{p} proc x {t} thread"
            out = work / f"dp-{p}x{t}-{r}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(p),
                   "--master-addr", "127.0.0.1", "--master-port", str(free_port()), __file__, "--dp-worker",
                   "--models", which, "--batch", str(batch), "--seq", str(seq), "--batches", str(n_batches),
                   "--reps", str(reps), "--threads", str(t), "--corpus", str(corpus), "--sites", ",".join(sites),
                   "--out", str(out), "--workdir", str(work / f"dp-{p}x{t}-{r}")]
            print(f"[{which}] data parallel: {key}, round {r + 1}/{rounds}", file=sys.stderr, flush=True)
            start = time.perf_counter()
            proc = subprocess.run(cmd, env={**env, "OMP_NUM_THREADS": str(t)}, capture_output=True, text=True,
                                  timeout=900)
            if proc.returncode != 0:
                raise SystemExit(f"torchrun {key} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
            got = json.loads(out.read_text())
            runs[key] += got["seconds"]
            per_rank[key].append(got["seconds_per_rank"])
            print(f"  {key}: {statistics.median(got['seconds']):.3f} s/harvest (launch "
                  f"{time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
    tokens = batch * n_batches * seq
    return {"tokens": tokens, "seconds": runs, "seconds_per_rank_last_rep": per_rank,
            "median_s": {k: statistics.median(v) for k, v in runs.items()}}


def dp_worker(args) -> None:
    """One torchrun rank: load, compile, warm up, then time --reps harvests between
    barriers; rank 0 writes {"seconds": [...], "seconds_per_rank": ...} to --out."""
    import torch
    import torch.distributed as dist

    import fxlens

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    tok = load_tokenizer(args.models)
    _, hf_copy, _ = bench.load_hf(args.models)
    fx = fxlens.from_pretrained_no_processing(hf_copy, tokenizer=tok, self_check=False).compile()
    sites = args.sites.split(",")
    n_tokens = args.batch * args.batches * args.seq
    work = Path(args.workdir)

    def run(i):
        return fxlens.harvest(fx, args.corpus, sites, out_dir=work / f"rep{i}", seq_len=args.seq,
                              batch_size=args.batch, shard_rows=args.batch, max_tokens=n_tokens, progress=False)

    with torch.inference_mode():
        run("warm")
        seconds, index = [], None
        for i in range(args.reps):
            dist.barrier()
            start = time.perf_counter()
            index = run(i)                           # ends with an all-gather: every rank is done
            seconds.append(time.perf_counter() - start)
            if rank == 0:
                shutil.rmtree(work / f"rep{i}", ignore_errors=True)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"seconds": seconds, "world_size": dist.get_world_size(),
                                              "seconds_per_rank": index["seconds_per_rank"]}))
        shutil.rmtree(work, ignore_errors=True)
    dist.destroy_process_group()


# --- report ------------------------------------------------------------------------------
def table(r: dict) -> str:
    """The harvest phase's table."""
    times = r["times"]
    ceiling = times["HF compiled forward"]["median_s"]
    lines = [f"### {r['model']}: {r['label']}",
             f"{r['batches']} batches of {r['batch']} x {r['seq']} = {r['tokens']} tokens per variant; "
             f"1 site = {r['sites']['1'][0]}, {r['sites']['N']} sites = blocks.*.hook_resid_post; "
             f"torch threads {r['threads']}; load average at the end {r['loadavg'][0]:.1f}", "",
             "| variant | median s | tokens/s | x HF compiled tokens/s | compile s |",
             "|---|---:|---:|---:|---:|"]
    for name, t in times.items():
        lines.append(f"| {name} | {t['median_s']:.3f} | {r['tokens'] / t['median_s']:,.0f} | "
                     f"{ceiling / t['median_s']:.2f} | {t['first_s'] - t['median_s']:.1f} |")
    if r["max_abs_diff_fxlens_vs_tl"]:
        lines.append("\nmax |fxlens - TL| over the harvested shards: "
                     + ", ".join(f"{k} {v:.1e}" for k, v in r["max_abs_diff_fxlens_vs_tl"].items()))
    return "\n".join(lines)


def dp_table(r: dict) -> str:
    """The data-parallel table (empty without --dp runs)."""
    lines = []
    if "dp" in r:
        dp = r["dp"]
        base = dp["median_s"]
        lines += [f"### {r['model']}: data parallel",
                  f"1-site harvest of {dp['tokens']} tokens (one shard per batch), seconds per harvest "
                  f"(medians over {len(next(iter(dp['seconds'].values())))} reps):", "",
                  "| torchrun | median s | tokens/s | speedup vs 1 proc x 1 thread | vs 1 proc x 2 threads |",
                  "|---|---:|---:|---:|---:|"]
        for k, s in base.items():
            lines.append(f"| {k} | {s:.3f} | {dp['tokens'] / s:,.0f} | {base['1 proc x 1 thread'] / s:.2f} | "
                         f"{base['1 proc x 2 thread'] / s:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = bench.arguments(__doc__, "tiny,gpt2-small", 4, 128, 5)
    ap.add_argument("--batches", type=int, default=8, help="batches per harvest (rows = batch * batches)")
    ap.add_argument("--no-dp", action="store_true", help="skip the torchrun data-parallel runs")
    ap.add_argument("--dp-rounds", type=int, default=1, help="launches of each data-parallel setting")
    # the torchrun worker's own options
    ap.add_argument("--dp-worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--corpus", help=argparse.SUPPRESS)
    ap.add_argument("--sites", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.dp_worker:
        import warnings

        warnings.filterwarnings("ignore")
        dp_worker(args)
        return
    dp = None if args.no_dp else {"reps": args.reps, "rounds": args.dp_rounds}
    bench.run_models(args, functools.partial(bench_model, n_batches=args.batches, dp=dp), dp_table)


if __name__ == "__main__":
    main()
