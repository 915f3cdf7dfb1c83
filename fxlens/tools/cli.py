"""The fxlens command line.

  fxlens smollm2 [--prompt TEXT]            instrument SmolLM2-135M-Instruct, show predictions
  fxlens dump MODEL -o FILE [--per-pass]    the annotated graph: .txt .dot .svg .html .json
                                            (--format model-explorer: Model Explorer's graph JSON)
  fxlens explore MODEL [--prompt TEXT]      the graph in Model Explorer (127.0.0.1), activation norms overlaid
  fxlens sites MODEL                        every hook name with its shape
  fxlens cache MODEL --prompt TEXT -o FILE.safetensors [--names NAME ...]
  fxlens harvest MODEL --text FILE --names PATTERN --seq-len N --batch-size B -o DIR
                                            activations over a corpus, as shards
                                            (torchrun --nproc-per-node K -m fxlens harvest ...)

MODEL is a checkpoint folder or a hub id already in the local HF cache
(`--gguf-file` names a GGUF file in it). Bad input prints one line on stderr
and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import torch

from fxlens.api import from_pretrained, from_pretrained_no_processing
from fxlens.errors import FxlensError
from fxlens.ir.graph import module_path
from fxlens.tools import dump, explorer
from fxlens.tools.checkpoints import load_smollm2
from fxlens.tools.dump import FORMATS, LEVELS, DumpError, check_writable
from fxlens.tools.harvesting import DTYPES, Corpus, World, fxlens_version, harvest
from fxlens.discovery.names import resolve_names

EXIT_ERROR = 2
# the `sites` probe: a short token sequence, enough to give every hook its shape
PROBE_LEN = 5


# --- shared steps ----------------------------------------------------------------------

class Status:
    """A one-line status bar on stderr for the slow steps (capture, each pass,
    the run); tqdm leaves it out when stderr is not a terminal, so pipes and
    logs stay clean. Called as an `on_pass` callback."""

    def __init__(self, what: str):
        from tqdm import tqdm

        self.what = what
        self.bar = tqdm(total=None, desc=f"{what}: capture (torch.export)", bar_format="{desc} [{elapsed}]",
                        disable=None, leave=False, file=sys.stderr)

    def step(self, text: str) -> None:
        self.bar.set_description_str(f"{self.what}: {text}")

    def __call__(self, name, gm, result) -> None:
        self.step(f"pass {name} done")

    def close(self) -> None:
        self.bar.close()


@contextlib.contextmanager
def progress(what: str):
    status = Status(what)
    try:
        yield status
    finally:
        status.close()


def _chain(*callbacks):
    def on_pass(name, gm, result):
        for cb in callbacks:
            if cb is not None:
                cb(name, gm, result)
    return on_pass


def load(args, status: Status, on_pass=None):
    """The instrumented model named on the command line."""
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    make = from_pretrained if args.processed else from_pretrained_no_processing
    return make(args.model, on_pass=_chain(status, on_pass), **kwargs)


@contextlib.contextmanager
def quiet_transformers():
    """transformers draws its own bars and warnings for every load; the CLI
    shows one bar. Restored on the way out: `main` may run inside a program."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _table(rows: list[tuple], header: tuple) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = lambda r: "  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(tuple("-" * w for w in widths)), *map(line, rows)])


def _shape(t: torch.Tensor) -> str:
    return "[" + ", ".join(map(str, t.shape)) + "]"


# --- smollm2 (the README's main run) ---------------------------------------------------

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
    print("loading SmolLM2-135M-Instruct (GGUF, dequantised to float32) and instrumenting it ...",
          flush=True)
    with progress("fxlens: SmolLM2-135M-Instruct") as status:
        model = load_smollm2(on_pass=status)
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


# --- dump ------------------------------------------------------------------------------

def cmd_dump(args) -> int:
    fmt = dump.format_of(args.output, args.format)
    dump.check_writable(args.output)   # before the slow load, not after it
    per_pass = dump.PerPassDumper(args.output, fmt, args.level, title=args.model) if args.per_pass else None
    with progress(f"fxlens: {args.model}") as status:
        model = load(args, status, on_pass=per_pass)
        status.step(f"write {fmt}")
        path = dump.dump(model.graph_module, args.output, fmt, args.level, title=_title(args, model))
    for p in (per_pass.written if per_pass else []):
        print(f"wrote {p}")
    level = "ops and modules" if fmt in ("html", "model-explorer") else args.level
    print(f"wrote {path} ({fmt}, {level} level; the graph has {len(model.graph_module.graph.nodes)} "
          f"nodes and {len(model.hook_names)} hooks)")
    return 0


def _title(args, model) -> str:
    done = [k for k, v in model.processing.items() if v]
    return f"{args.model} ({'processed: ' + ', '.join(done) if done else 'weights unprocessed'})"


# --- sites -----------------------------------------------------------------------------

def probe_tokens(model) -> torch.Tensor:
    """[1, pos] token ids; ids, not text, so a checkpoint without a tokenizer works too."""
    n = min(PROBE_LEN, model.cfg.n_ctx)
    return (torch.arange(1, n + 1) % model.cfg.d_vocab).unsqueeze(0)


def hook_modules(model) -> dict[str, str]:
    """Hook name -> the HF module path its node came from."""
    return {n.meta["fxlens.site"]: module_path(n) for n in model.graph_module.graph.nodes
            if "fxlens.site" in n.meta}


def cmd_sites(args) -> int:
    with progress(f"fxlens: {args.model}") as status:
        model = load(args, status)
        status.step("run the probe")
        tokens = probe_tokens(model)
        _, cache = model.run_with_cache(tokens)
    modules = hook_modules(model)
    rows = [(name, _shape(t), str(t.dtype).removeprefix("torch."), modules.get(name, ""))
            for name, t in cache.items()]
    print(_table(rows, ("hook", "shape", "dtype", "module")))
    print(f"\n{len(rows)} hooks of {args.model}; shapes on a probe of batch 1, pos {tokens.shape[1]}")
    return 0


# --- explore ---------------------------------------------------------------------------

def cmd_explore(args) -> int:
    explorer.graph_builder()   # the extra is there, before the slow load
    with progress(f"fxlens: {args.model}") as status:
        model = load(args, status)
        norms = None
        if args.prompt is not None:
            status.step("run_with_cache")
            norms = explorer.activation_norms(model, model.to_tokens(args.prompt))
        status.step("build the Model Explorer graph")
        config = explorer.explorer_config(dump.to_networkx(model.graph_module, _title(args, model)),
                                          norms, name="fxlens")
    explorer.serve(config, args.port)
    return 0


# --- cache -----------------------------------------------------------------------------

def cache_metadata(model, prompt: str, tokens: torch.Tensor) -> dict[str, str]:
    """safetensors metadata holds strings only: lists and dicts go in as JSON."""
    processing = model.processing   # the flags, as a dict or a processing log of them
    meta = {"format": "fxlens activations", "fxlens_version": fxlens_version(),
            "model": str(model.cfg.model_name), "prompt": prompt,
            "tokens": json.dumps(tokens[0].tolist()),
            "processing": json.dumps({k: bool(v) for k, v in processing.items()})}
    if getattr(processing, "skipped", None):
        meta["processing_skipped"] = json.dumps(list(processing.skipped))
    with contextlib.suppress(FxlensError):
        meta["str_tokens"] = json.dumps(model.to_str_tokens(tokens[0]))
    return meta


def save_activations(cache, path, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    # chained hooks hand one tensor to two names (resid_post -> next resid_pre)
    # and layouts leave views; safetensors wants separate contiguous storage
    tensors = {k: v.detach().cpu().clone(memory_format=torch.contiguous_format) for k, v in cache.items()}
    try:
        save_file(tensors, str(path), metadata=metadata)
    except OSError as exc:
        raise DumpError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


def cmd_cache(args) -> int:
    path = check_writable(args.output)
    with progress(f"fxlens: {args.model}") as status:
        model = load(args, status)
        names = resolve_names(model.hook_names, args.names)
        status.step("run_with_cache")
        tokens = model.to_tokens(args.prompt)
        _, cache = model.run_with_cache(tokens, names_filter=names)
        status.step("save")
        save_activations(cache, path, cache_metadata(model, args.prompt, tokens))
    size = sum(t.numel() * t.element_size() for t in cache.values())
    print(f"wrote {path}: {len(cache)} activations, {size / 2**20:.2f} MiB, "
          f"{tokens.shape[1]} tokens")
    return 0


# --- harvest ---------------------------------------------------------------------------

def _device(arg: str | None) -> str:
    """--device, else this rank's GPU under torchrun (LOCAL_RANK), else the CPU."""
    if arg:
        return arg
    if torch.cuda.is_available():
        import os
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return "cpu"


def cmd_harvest(args) -> int:
    Corpus(args.text)   # a missing or unreadable corpus fails before the slow load
    world = World.current()
    kwargs = {"gguf_file": args.gguf_file} if args.gguf_file else {}
    make = from_pretrained if args.processed else from_pretrained_no_processing
    with progress(f"fxlens: {args.model}") as status:
        model = make(args.model, on_pass=status, device=_device(args.device),
                     dtype=DTYPES[args.model_dtype], **kwargs)
    if args.compile:
        model.compile()
    index = harvest(model, args.text, args.names, out_dir=args.output, seq_len=args.seq_len,
                           batch_size=args.batch_size, max_tokens=args.max_tokens, dtype=args.dtype,
                           shard_rows=args.shard_rows, model_name=args.model)
    if world.rank == 0:
        print(f"wrote {args.output}: {len(index['shards'])} shards, {index['rows']} rows of "
              f"{index['seq_len']} tokens, {len(index['sites'])} sites ({index['dtype']})"
              + (f", {world.size} ranks" if world.size > 1 else ""))
    return 0


# --- main ------------------------------------------------------------------------------

def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL", help="checkpoint folder, or a hub id in the local HF cache")
    p.add_argument("--gguf-file", help="a GGUF file inside MODEL's folder")
    p.add_argument("--processed", action="store_true",
                   help="process weights like TransformerLens (fold_ln, centring, value biases); "
                        "default: unprocessed")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="fxlens", description=__doc__,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("smollm2", help="instrument SmolLM2-135M-Instruct and show predictions and activations")
    p.add_argument("--prompt", default="The capital of France is")
    p.add_argument("--top-k", type=int, default=5)
    p.set_defaults(fn=cmd_smollm2)

    p = sub.add_parser("dump", help="write the annotated graph (txt, dot, svg, html, json, model-explorer)")
    _model_args(p)
    p.add_argument("-o", "--output", required=True, help="file to write; its suffix picks the format")
    p.add_argument("--format", choices=FORMATS, help="the format, whatever the suffix")
    p.add_argument("--level", choices=LEVELS, default="ops",
                   help="ops: every node; modules: one node per module (the HTML page has both)")
    p.add_argument("--per-pass", action="store_true",
                   help="also write the graph after each pass: FILE.01-<pass>.<suffix>, ...")
    p.set_defaults(fn=cmd_dump)

    p = sub.add_parser("explore", help="open the graph in Model Explorer's local server (127.0.0.1), "
                                       "with each site's activation norm on a prompt overlaid")
    _model_args(p)
    p.add_argument("--prompt", help="run_with_cache on this text and overlay each site's activation norm")
    p.add_argument("--port", type=int, help="default: a free port (printed)")
    p.set_defaults(fn=cmd_explore)

    p = sub.add_parser("sites", help="list every hook name with its shape")
    _model_args(p)
    p.set_defaults(fn=cmd_sites)

    p = sub.add_parser("cache", help="save activations to a .safetensors file with metadata")
    _model_args(p)
    p.add_argument("--prompt", required=True)
    p.add_argument("--names", nargs="+", metavar="NAME",
                   help="hook names or globs (blocks.*.attn.hook_pattern); default: every hook")
    p.add_argument("-o", "--output", required=True, help="the .safetensors file to write")
    p.set_defaults(fn=cmd_cache)

    p = sub.add_parser("harvest", help="activations of chosen sites over a text corpus, as safetensors "
                                       "shards (data parallel under torchrun)")
    _model_args(p)
    p.add_argument("--text", required=True, metavar="FILE",
                   help="plain text (one document a line) or JSON lines with a 'text' field")
    p.add_argument("--names", required=True, nargs="+", action="extend", metavar="PATTERN",
                   help="hook names or globs (blocks.*.hook_resid_post); repeatable")
    p.add_argument("--seq-len", type=int, required=True, help="tokens per row")
    p.add_argument("--batch-size", type=int, required=True, help="rows per forward pass")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="folder for shard-00000.safetensors ... and index.json; rerun to resume")
    p.add_argument("--max-tokens", type=int, help="stop after this many tokens (whole rows)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"],
                   help="stored dtype of the activations (default: the model's)")
    p.add_argument("--model-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype to run the model in (default float32)")
    p.add_argument("--compile", action="store_true", help="run the model through torch.compile")
    p.add_argument("--shard-rows", type=int,
                   help="rows per shard, a multiple of --batch-size (default: up to 256 MiB a shard)")
    p.add_argument("--device", help="default: cuda:LOCAL_RANK when CUDA is available, else cpu")
    p.set_defaults(fn=cmd_harvest)
    return top


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        with quiet_transformers():
            return args.fn(args)
    except FxlensError as exc:
        print(f"fxlens: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except OSError as exc:  # a file the command had to read or write
        print(f"fxlens: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("fxlens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
