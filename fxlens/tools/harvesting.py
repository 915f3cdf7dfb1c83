"""Activations of chosen sites over a text corpus, written as safetensors shards.

    fxlens.harvest(model, "corpus.txt", ["blocks.*.hook_resid_post"], out_dir="acts",
                   seq_len=128, batch_size=8)

The corpus is read one document at a time (plain text: one document a line;
JSON lines: each object's "text"), tokenized, and packed into rows of
`seq_len` tokens by SAELens's `ActivationsStore` convention: every row starts
with BOS, documents are separated by BOS, a document runs on into the next row,
the last incomplete row is dropped (`pack_rows`). A background thread reads,
tokenizes and packs a few batches ahead of the model (`prefetch`), so
tokenization overlaps the forward passes.

Rows are numbered 0, 1, ... and grouped into shards of `shard_rows` rows (a
whole number of batches). Shard s holds rows [s*shard_rows, (s+1)*shard_rows)
and is `shard-{s:05d}.safetensors`: one tensor per site, [rows, ...] in
TransformerLens layout, plus `row_index` [rows] and `tokens` [rows, seq_len].
A shard is built in memory, written to a temporary name and renamed, then
dropped: memory is one shard, whatever the corpus size, and a killed run leaves
only whole shards. Running the same harvest again skips every shard already on
disk (after checking it holds the same tokens and settings) and never writes a
row twice.

Data parallel: under `torchrun` (RANK / WORLD_SIZE set, read once here) rank r
of K harvests shards r, r+K, r+2K, ... -- every K-th run of `shard_rows // batch_size`
batches -- and the shards are the same files a single process writes. After a
barrier (an all-gather of the shard lists over torch.distributed: gloo on CPU,
NCCL on CUDA) rank 0 writes `index.json`. Across machines `out_dir` should be a
shared filesystem; otherwise each machine keeps its own shards and rank 0's
index lists them all.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import math
import os
import queue
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from importlib.metadata import PackageNotFoundError, version

import torch

from fxlens.discovery.names import resolve_names
from fxlens.errors import ContextLengthError, HarvestError

INDEX = "index.json"
FORMAT = "fxlens harvest"
# default shard size: as many whole batches as keep a shard's activations under this
SHARD_BYTES = 256 * 2**20
# documents tokenized per call: the fast tokenizer batches them (in Rust)
TOKENIZE_CHUNK = 256
# rows read, tokenized and packed ahead of the model by a background thread (at least)
PREFETCH_ROWS = 64

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# --- the corpus -------------------------------------------------------------------------

class Corpus:
    """Documents of a text file, read lazily: plain text (one document a line) or
    JSON lines with a "text" field (told apart by the first non-empty line).
    `bytes_read` / `size` let the progress bar estimate the total."""

    def __init__(self, path):
        self.path = Path(path)
        if not self.path.is_file():
            raise HarvestError(f"--text {str(self.path)!r}: no such file")
        self.size = self.path.stat().st_size
        self.bytes_read = 0
        self.jsonl = self._sniff()

    def _sniff(self) -> bool:
        with open(self.path, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    try:
                        obj = json.loads(line)
                    except ValueError:
                        return False
                    return isinstance(obj, dict) and "text" in obj
        return False

    def __iter__(self) -> Iterator[str]:
        self.bytes_read = 0
        with open(self.path, "rb") as f:
            for lineno, raw in enumerate(f, 1):
                self.bytes_read += len(raw)
                line = raw.decode("utf-8").rstrip("\r\n")
                if not line.strip():
                    continue
                if not self.jsonl:
                    yield line
                    continue
                try:
                    text = json.loads(line)["text"]
                except (ValueError, KeyError, TypeError):
                    raise HarvestError(f"{self.path}:{lineno}: not a JSON object with a 'text' field "
                                       f"(the file's first line is one, so every line must be)") from None
                if not isinstance(text, str):
                    raise HarvestError(f"{self.path}:{lineno}: 'text' is {type(text).__name__}, not a string")
                yield text


def tokenize(docs: Iterable[str], tokenizer, chunk: int = TOKENIZE_CHUNK) -> Iterator[list[int]]:
    """Each document's token ids, no special tokens (as `model.to_tokens(doc, prepend_bos=False)`)."""
    batch: list[str] = []
    for doc in docs:
        batch.append(doc)
        if len(batch) == chunk:
            yield from tokenizer(batch, add_special_tokens=False)["input_ids"]
            batch = []
    if batch:
        yield from tokenizer(batch, add_special_tokens=False)["input_ids"]


def pack_rows(docs: Iterable[list[int]], seq_len: int, bos: int | None) -> Iterator[list[int]]:
    """Rows of `seq_len` tokens, SAELens's convention (`concat_and_batch_sequences`
    with begin_batch_token = sequence_separator = BOS):

        docs [a b c d e] [f g], seq_len 4  ->  [BOS a b c] [BOS d e BOS] [BOS f g ...

    A row starts with BOS unless its first token already is BOS; a document that
    joins a row already begun is preceded by BOS (unless it starts with one); a
    row may end on that separator. Empty documents are skipped, and the last
    incomplete row is dropped. `bos=None`: plain concatenation."""
    row: list[int] = []
    for toks in docs:
        if not toks:
            continue
        if row and bos is not None and toks[0] != bos:   # separator between documents
            row.append(bos)
            if len(row) == seq_len:
                yield row
                row = []
        i = 0
        while i < len(toks):
            if not row and bos is not None and toks[i] != bos:
                row.append(bos)
            take = seq_len - len(row)
            row.extend(toks[i:i + take])
            i += take
            if len(row) == seq_len:
                yield row
                row = []


def prefetch(items: Iterable, depth: int) -> Iterator:
    """`items` in order, produced by a background thread up to `depth` ahead, so
    the corpus is read, tokenized (the fast tokenizer releases the GIL) and packed
    while the model runs. An exception in the producer is raised here; closing
    this iterator (or dropping it) stops the thread."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry) -> bool:
        while not stop.is_set():
            try:
                q.put(entry, timeout=0.05)
                return True
            except queue.Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(("item", item)):
                    return
            put(("end", None))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, raised there
            put(("error", exc))

    thread = threading.Thread(target=produce, name="fxlens-harvest-rows", daemon=True)
    thread.start()
    try:
        while True:
            kind, item = q.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


# --- the world (torchrun) ---------------------------------------------------------------

@dataclass(frozen=True)
class World:
    """This process's rank and the number of processes, from torch.distributed when
    it is initialised, else from torchrun's RANK / WORLD_SIZE (read once)."""

    rank: int = 0
    size: int = 1

    @classmethod
    def current(cls) -> "World":
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            return cls(dist.get_rank(), dist.get_world_size())
        return cls(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))

    def owns(self, shard: int) -> bool:
        return shard % self.size == self.rank


@contextlib.contextmanager
def process_group(world: World, device: torch.device):
    """torch.distributed for a multi-process world (gloo on CPU, NCCL on CUDA);
    set up here if the caller has not, and torn down on the way out."""
    import torch.distributed as dist

    mine = world.size > 1 and not dist.is_initialized()
    if mine:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend)
    try:
        yield
    finally:
        if mine:
            dist.destroy_process_group()


def gather(world: World, obj):
    """Every rank's `obj`, in rank order (the barrier before the index is written)."""
    if world.size == 1:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


# --- shards -----------------------------------------------------------------------------

@dataclass
class Plan:
    """What a harvest writes; `fingerprint` goes into every shard, so a rerun can
    tell its own shards from another harvest's."""

    model: str
    sites: list[str]
    shapes: dict[str, list[int]]      # per row: a shard's tensor is [rows, *shape]
    dtype: torch.dtype
    seq_len: int
    batch_size: int
    shard_rows: int
    bos_token_id: int | None
    processing: dict[str, bool] = field(default_factory=dict)

    def fingerprint(self) -> dict:
        return {"model": self.model, "sites": self.sites, "dtype": _dtype_name(self.dtype),
                "seq_len": self.seq_len, "batch_size": self.batch_size, "shard_rows": self.shard_rows,
                "bos_token_id": self.bos_token_id, "processing": self.processing}


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def read_shard_header(path: Path) -> tuple[dict, torch.Tensor]:
    """(the shard's fingerprint, its tokens)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
        tokens = f.get_tensor("tokens")
    return json.loads(meta.get("fingerprint", "{}")), tokens


def check_done(path: Path, plan: Plan, tokens: torch.Tensor) -> bool:
    """True if `path` is this harvest's shard for these token rows; raises if it
    is another harvest's (another corpus, model or setting)."""
    if not path.exists():
        return False
    try:
        fingerprint, have = read_shard_header(path)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is refused the same way
        raise HarvestError(f"{path} is not a readable shard ({type(exc).__name__}: {exc}); "
                           f"remove it or use a new output folder") from None
    if fingerprint != plan.fingerprint():
        diff = sorted(k for k in plan.fingerprint() if fingerprint.get(k) != plan.fingerprint()[k])
        raise HarvestError(f"{path} was written by another harvest (it differs in {', '.join(diff)}); "
                           f"use a new output folder, or remove the old shards")
    if not torch.equal(have, tokens):
        raise HarvestError(f"{path} holds other tokens than this corpus gives for its rows; the corpus "
                           f"changed since it was written: use a new output folder")
    return True


def write_shard(path: Path, tensors: dict[str, torch.Tensor], plan: Plan, rows: range) -> None:
    """Write to a temporary name, then rename: a shard on disk is always whole."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    meta = {"format": f"{FORMAT} shard", "fingerprint": json.dumps(plan.fingerprint()),
            "rows": json.dumps([rows.start, rows.stop])}
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise HarvestError(f"cannot write {str(path)!r}: {exc.strerror or exc}") from exc


@functools.cache
def fxlens_version() -> str:
    """The installed fxlens's version ("unknown" when it is not installed); looked up
    once (importlib.metadata scans site-packages: ~10 ms a call)."""
    try:
        return version("fxlens")
    except PackageNotFoundError:
        return "unknown"


# --- the harvest ------------------------------------------------------------------------

def _resolve_sites(model, names) -> list[str]:
    """Hook names from names / globs / a predicate, in TransformerLens order."""
    if callable(names):
        chosen = [n for n in model.hook_names if names(n)]
    else:
        chosen = resolve_names(model.hook_names, [names] if isinstance(names, str) else list(names or [])) or []
    if not chosen:
        raise HarvestError("name at least one site to harvest (a hook name or a glob such as "
                           "'blocks.*.hook_resid_post'); `fxlens sites MODEL` lists them")
    return model._names(chosen)   # validates, materialises opt-in sites, orders canonically


def _row_shapes(model, sites: list[str], seq_len: int) -> dict[str, list[int]]:
    """Each site's shape for one row: an eager run on one placeholder row (no
    compilation, and independent of the corpus)."""
    probe = torch.zeros((1, seq_len), dtype=torch.long, device=model.cfg.device)
    with torch.no_grad():
        _, store = model._run_eager(probe, sites)
    return {n: list(store[n].shape[1:]) for n in sites}


def _first_batch(rows: Iterator[list[int]], batch_size: int, max_rows: int | None, owns_first: bool,
                 forward, device, probe: Callable[[], dict]):
    """(rows again, each site's shape for one row, {"acts": the first batch's
    activations, "seconds": its time} or {} when it was not run). The rank that
    harvests shard 0 takes the shapes from its first batch and keeps the
    activations for it: no extra forward pass (an eager probe of one row costs
    about 1/batch_size of a compiled batch). The other ranks, and an empty corpus,
    run `probe`."""
    head = list(itertools.islice(rows, batch_size if max_rows is None else min(batch_size, max_rows)))
    rows = itertools.chain(head, rows)
    if not owns_first or not head:
        return rows, probe(), {}
    start = time.perf_counter()
    with torch.no_grad():
        acts = _forward_batch(torch.tensor(head, dtype=torch.long), batch_size, forward, device)
    shapes = {n: list(t.shape[1:]) for n, t in acts.items()}
    return rows, shapes, {"acts": acts, "seconds": time.perf_counter() - start}


def _default_shard_rows(shapes: dict, dtype: torch.dtype, batch_size: int) -> int:
    row_bytes = sum(math.prod(s) for s in shapes.values()) * torch.empty((), dtype=dtype).element_size()
    return batch_size * max(1, SHARD_BYTES // max(1, row_bytes * batch_size))


def _processing(model) -> dict[str, bool]:
    return {k: bool(v) for k, v in (model.processing or {}).items()}


class _Progress:
    """tokens/s and an ETA: the total is known from max_tokens, or estimated from
    the bytes of the corpus file read so far."""

    def __init__(self, enabled, world: World, max_rows: int | None, plan: Plan, corpus):
        from tqdm import tqdm

        self.corpus = corpus
        self.max_tokens = None if max_rows is None else self._mine(max_rows, plan, world) * plan.seq_len
        desc = "harvest" if world.size == 1 else f"harvest rank {world.rank}/{world.size}"
        # rank 0 draws the bar (tqdm's None: only on a terminal); the other ranks stay quiet
        disable = (None if enabled is None else not enabled) if world.rank == 0 else True
        self.bar = tqdm(total=self.max_tokens, unit="tok", unit_scale=True, desc=desc,
                        disable=disable, file=sys.stderr, dynamic_ncols=True)

    @staticmethod
    def _mine(rows: int, plan: Plan, world: World) -> int:
        """Rows of this rank's shards among the first `rows`."""
        n_shards = -(-rows // plan.shard_rows)
        return sum(min(plan.shard_rows, rows - s * plan.shard_rows)
                   for s in range(world.rank, n_shards, world.size))

    def update(self, tokens: int) -> None:
        self.bar.update(tokens)
        if self.max_tokens is None and self.corpus is not None and self.corpus.bytes_read:
            # rows so far / fraction of the file read -> rows in the file, this rank's share
            est = self.bar.n / max(self.corpus.bytes_read / max(self.corpus.size, 1), 1e-9)
            self.bar.total = int(est)
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


def harvest(model, texts, names, *, out_dir, seq_len: int, batch_size: int, max_tokens: int | None = None,
            dtype=None, shard_rows: int | None = None, prepend_bos: bool | None = None,
            progress: bool | None = None, model_name: str | None = None,
            _forward: Callable | None = None) -> dict:
    """Harvest the activations of `names` over `texts` into shards in `out_dir`
    (see the module docstring); returns the index (also written to index.json by
    rank 0).

    model       a HookedModel (compiled or not: `model.compile()` first for speed)
    texts       a file path (plain text or JSON lines) or an iterable of strings
    names       hook names, globs ('blocks.*.hook_resid_post'), or a predicate on names
    seq_len     tokens per row; batch_size: rows per forward pass
    max_tokens  stop after max_tokens // seq_len rows
    dtype       the stored dtype (default: the model's)
    shard_rows  rows per shard, a multiple of batch_size (default: whole batches
                up to 256 MiB of activations per shard)
    prepend_bos BOS at row starts and between documents (default: cfg.default_prepend_bos)
    progress    the bar on stderr (None: only when stderr is a terminal)
    """
    if getattr(model, "pipeline", None) is not None:
        raise HarvestError("harvest splits batches between the torchrun ranks (data parallel); a model "
                           "loaded with pipeline_stages needs every rank on every batch: load it without "
                           "pipeline_stages")
    if seq_len < 2 or batch_size < 1:
        raise HarvestError(f"seq_len={seq_len}, batch_size={batch_size}: a row needs at least 2 tokens "
                           f"and a batch at least one row")
    if seq_len > model.cfg.n_ctx:
        raise ContextLengthError(f"seq_len={seq_len} is longer than the model's context "
                                 f"(n_ctx={model.cfg.n_ctx})")
    max_rows = None if max_tokens is None else max_tokens // seq_len
    if max_rows is not None and max_rows < 1:
        raise HarvestError(f"max_tokens={max_tokens} is less than one row of seq_len={seq_len} tokens")
    dtype = DTYPES[dtype] if isinstance(dtype, str) else (dtype or model.cfg.dtype)
    tokenizer = model._need_tokenizer()
    bos = tokenizer.bos_token_id if model._bos(prepend_bos) else None
    corpus = Corpus(texts) if isinstance(texts, (str, os.PathLike)) else None
    docs = corpus if corpus is not None else texts

    sites = _resolve_sites(model, names)
    world = World.current()
    forward = _forward or _site_forward(model, sites)
    device = torch.device(model.cfg.device)
    packed = prefetch(pack_rows(tokenize(docs, tokenizer), seq_len, bos), max(PREFETCH_ROWS, 2 * batch_size))
    with contextlib.closing(packed):                  # stops the reading thread, however this ends
        rows, shapes, first = _first_batch(packed, batch_size, max_rows, world.owns(0), forward, device,
                                           lambda: _row_shapes(model, sites, seq_len))
        shard_rows = shard_rows or _default_shard_rows(shapes, dtype, batch_size)
        if shard_rows % batch_size:
            raise HarvestError(f"shard_rows={shard_rows} is not a multiple of batch_size={batch_size}")
        plan = Plan(model=str(model_name or model.cfg.model_name), sites=sites, shapes=shapes, dtype=dtype,
                    seq_len=seq_len, batch_size=batch_size, shard_rows=shard_rows, bos_token_id=bos,
                    processing=_processing(model))

        out = Path(out_dir)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise HarvestError(f"cannot create {str(out)!r}: {exc.strerror or exc}") from exc

        with process_group(world, device):
            bar = _Progress(progress, world, max_rows, plan, corpus)
            try:
                mine, total_rows, seconds = _harvest_shards(rows, plan, out, world, max_rows, forward, device, bar,
                                                            first)
            finally:
                bar.close()
            everyone = gather(world, {"rank": world.rank, "shards": mine, "seconds": seconds})
            index = _index(plan, everyone, total_rows, world, texts if corpus is not None else None, max_tokens)
            if world.rank == 0:
                tmp = out / (INDEX + ".tmp")
                tmp.write_text(json.dumps(index, indent=1) + "\n")
                os.replace(tmp, out / INDEX)
        return index


def _site_forward(model, sites: list[str]) -> Callable:
    """tokens [batch, seq_len] -> {site: activation} (TransformerLens layout)."""

    def forward(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        _, cache = model.run_with_cache(tokens, names_filter=sites, return_type=None,
                                        return_cache_object=False)
        return cache

    return forward


def _shards(rows: Iterator[list[int]], shard_rows: int, max_rows: int | None):
    """(shard index, its range of global rows, its token rows) in order; the rows
    past max_rows are never read."""
    shard, batch, start = 0, [], 0
    for row in rows:
        batch.append(row)
        last = max_rows is not None and start + len(batch) == max_rows
        if last or len(batch) == shard_rows:
            yield shard, range(start, start + len(batch)), batch
            if last:
                return
            shard, start, batch = shard + 1, start + len(batch), []
    if batch:
        yield shard, range(start, start + len(batch)), batch


def _harvest_shards(rows, plan: Plan, out: Path, world: World, max_rows, forward, device, bar, first: dict):
    """Run and write this rank's shards (`first`: shard 0's first batch when it was
    already run, taken out when shard 0 comes, so it is not held on). Returns (its
    shard entries, the corpus's row count, seconds spent on shards it harvested)."""
    mine, total, seconds = [], 0, 0.0
    for shard, span, token_rows in _shards(rows, plan.shard_rows, max_rows):
        total = span.stop
        if not world.owns(shard):
            continue
        tokens = torch.tensor(token_rows, dtype=torch.long)   # [rows, seq_len]
        path = out / shard_name(shard)
        entry = {"file": path.name, "rows": [span.start, span.stop], "rank": world.rank}
        ready = first.pop("acts", None) if shard == 0 else None
        if not check_done(path, plan, tokens):
            seconds += first.pop("seconds", 0.0) if ready is not None else 0.0
            start = time.perf_counter()
            tensors = _run_shard(tokens, plan, forward, device, ready)
            tensors["row_index"] = torch.arange(span.start, span.stop, dtype=torch.long)
            tensors["tokens"] = tokens
            write_shard(path, tensors, plan, span)
            del tensors, ready                           # drop before the next shard
            seconds += time.perf_counter() - start
        mine.append(entry)
        bar.update(len(span) * plan.seq_len)
    if total == 0:
        raise HarvestError(f"the corpus gives no complete row of {plan.seq_len} tokens")
    return mine, total, seconds


def _forward_batch(batch: torch.Tensor, batch_size: int, forward, device) -> dict[str, torch.Tensor]:
    """{site: activation} of up to batch_size rows. A short batch is padded with
    copies of its last row (the caller keeps the first rows), so every forward
    pass has the same shape and a compiled model compiles once."""
    k = batch.shape[0]
    if k < batch_size:
        batch = torch.cat([batch, batch[-1:].expand(batch_size - k, -1)])
    return forward(batch.to(device))


def _run_shard(tokens: torch.Tensor, plan: Plan, forward, device, first=None) -> dict[str, torch.Tensor]:
    """{site: [rows, ...]}: the shard's rows in batches of batch_size (`first`: the
    first batch's activations when they were already computed)."""
    n = tokens.shape[0]
    bufs = {s: torch.empty((n, *plan.shapes[s]), dtype=plan.dtype) for s in plan.sites}
    with torch.no_grad():
        for lo in range(0, n, plan.batch_size):
            k = min(plan.batch_size, n - lo)
            acts = first if lo == 0 and first is not None else \
                _forward_batch(tokens[lo:lo + k], plan.batch_size, forward, device)
            for s in plan.sites:
                bufs[s][lo:lo + k].copy_(acts[s][:k])   # device -> CPU and dtype in one copy
            del acts
    return bufs


def _index(plan: Plan, everyone: list[dict], total_rows: int, world: World, text, max_tokens) -> dict:
    shards = sorted((e for r in everyone for e in r["shards"]), key=lambda e: e["rows"][0])
    return {"format": FORMAT, "fxlens_version": fxlens_version(), "model": plan.model, "sites": plan.sites,
            "shapes": plan.shapes, "dtype": _dtype_name(plan.dtype), "seq_len": plan.seq_len,
            "batch_size": plan.batch_size, "shard_rows": plan.shard_rows, "rows": total_rows,
            "tokens": total_rows * plan.seq_len, "bos_token_id": plan.bos_token_id,
            "processing": plan.processing, "text": None if text is None else str(text),
            "max_tokens": max_tokens, "world_size": world.size, "shards": shards,
            "seconds_per_rank": [round(r["seconds"], 3) for r in everyone],
            "layout": "each shard holds, for its rows, a tensor per site of shape [rows, *shapes[site]] "
                      "(TransformerLens layout), row_index [rows] and tokens [rows, seq_len]"}


def load_shards(out_dir) -> tuple[dict, dict[str, torch.Tensor]]:
    """(index, {name: tensor over all rows, in row order}) -- for tests and small
    harvests; large ones should read shard by shard."""
    from safetensors.torch import load_file

    out = Path(out_dir)
    index = json.loads((out / INDEX).read_text())
    parts = [load_file(str(out / s["file"])) for s in index["shards"]]
    return index, {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
