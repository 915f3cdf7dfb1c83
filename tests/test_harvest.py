"""fxlens harvest: rows packed as SAELens does, shards equal to run_with_cache,
resume after an interruption, and two gloo ranks under torchrun equal one process."""

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fxlens
from conftest import DATA, RTOL, oracle_model, rel_err
from fxlens.tools.cli import main
from fxlens.tools.harvesting import load_shards, pack_rows, prefetch

GPT2 = str(DATA / "models" / "gpt2")
SITES = ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern"]


@pytest.fixture(autouse=True)
def one_thread():
    """One torch thread, as each torchrun rank gets: the DP comparison needs it, and
    on a loaded 2-core machine two threads stall each other's OpenMP barriers."""
    with threads(1):
        yield


def corpus(n_docs: int = 60, seed: int = 0) -> list[str]:
    g = torch.Generator().manual_seed(seed)
    words = "the cat sat on a mat and then it ran far away from home into the night".split()
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(0, 40, (1,), generator=g))    # some empty, some longer than a row
        docs.append(" ".join(words[int(i)] for i in torch.randint(0, len(words), (n,), generator=g)))
    return docs


def shard_tensors(out: Path) -> dict[str, dict[str, torch.Tensor]]:
    return {p.name: load_file(str(p)) for p in sorted(out.glob("shard-*.safetensors"))}


# --- packing ---------------------------------------------------------------------------

def test_rows_follow_saelens_concat_and_batch():
    B = 1
    # a row starts with BOS; the next document is joined with a BOS separator, which
    # may end a row; the incomplete last row is dropped
    assert list(pack_rows([[5, 6, 7, 8, 9], [10, 11]], 4, B)) == [[B, 5, 6, 7], [B, 8, 9, B]]
    # a document (or a cut) that already starts with BOS gets no second one; empty docs vanish
    assert list(pack_rows([[B, 5, 6], [], [B, 7, 8, 9, 10, 11]], 4, B)) == [[B, 5, 6, B], [B, 7, 8, 9]]
    assert list(pack_rows([[5, 6, 7, B, 8, 9, 10]], 4, B)) == [[B, 5, 6, 7], [B, 8, 9, 10]]
    # a row filled exactly by one document: the next starts a fresh row (BOS, no separator)
    assert list(pack_rows([[5, 6, 7], [8, 9, 10]], 4, B)) == [[B, 5, 6, 7], [B, 8, 9, 10]]
    # no BOS: plain concatenation
    assert list(pack_rows([[5, 6, 7], [8, 9, 10, 11, 12]], 3, None)) == [[5, 6, 7], [8, 9, 10]]


def test_rows_read_ahead_keep_their_order_errors_and_stop():
    assert list(prefetch(iter(range(200)), 3)) == list(range(200))

    def bad_second_line():
        yield [1, 2]
        raise fxlens.HarvestError("corpus.jsonl:2: not a JSON object")

    rows = prefetch(bad_second_line(), 2)
    assert next(rows) == [1, 2]
    with pytest.raises(fxlens.HarvestError, match="corpus.jsonl:2"):   # the reader's error, here
        next(rows)
    endless = prefetch(itertools.count(), 2)
    assert next(endless) == 0
    endless.close()                             # a harvest that stops at max_tokens
    assert not [t for t in threading.enumerate() if t.name == "fxlens-harvest-rows"]


# --- one process -------------------------------------------------------------------------

def test_harvest_shards_equal_run_with_cache(tmp_path):
    model = oracle_model("gpt2")
    texts = corpus()
    index = fxlens.harvest(model, texts, ["hook_embed", "blocks.0.*resid_post", "blocks.1.attn.hook_pattern"],
                           out_dir=tmp_path, seq_len=16, batch_size=3, shard_rows=6, progress=False)
    bos = model.tokenizer.bos_token_id
    want_rows = list(pack_rows((model.to_tokens(t, prepend_bos=False)[0].tolist() if t else [] for t in texts),
                               16, bos))
    assert index["sites"] == SITES and index["rows"] == len(want_rows) and len(want_rows) % 6 != 0
    assert [s["rows"] for s in index["shards"]] == [[i, min(i + 6, len(want_rows))]
                                                    for i in range(0, len(want_rows), 6)]
    assert index["shapes"] == {"hook_embed": [16, 64], "blocks.0.hook_resid_post": [16, 64],
                               "blocks.1.attn.hook_pattern": [4, 16, 16]}
    assert json.loads((tmp_path / "index.json").read_text())["shards"] == index["shards"]
    assert index["dtype"] == "float32" and index["bos_token_id"] == bos and index["fxlens_version"]
    assert not any(index["processing"].values())

    _, got = load_shards(tmp_path)
    tokens = torch.tensor(want_rows)
    assert torch.equal(got["tokens"], tokens)
    assert torch.equal(got["row_index"], torch.arange(len(want_rows)))
    _, want = model.run_with_cache(tokens, names_filter=SITES)
    for name in SITES:
        # other batch groupings than the reference run: float32 rounding only
        assert got[name].shape == want[name].shape and rel_err(got[name], want[name]) <= RTOL, name
    assert not list(tmp_path.glob("*.tmp"))


def test_harvest_stores_dtype_and_stops_at_max_tokens(tmp_path):
    model = oracle_model("gpt2")
    index = fxlens.harvest(model, corpus(), "blocks.1.hook_resid_post", out_dir=tmp_path, seq_len=16,
                           batch_size=4, max_tokens=16 * 5 + 3, dtype="bfloat16", progress=False)
    _, got = load_shards(tmp_path)
    assert index["rows"] == 5 and got["blocks.1.hook_resid_post"].shape == (5, 16, 64)
    assert got["blocks.1.hook_resid_post"].dtype == torch.bfloat16 and index["dtype"] == "bfloat16"
    _, want = model.run_with_cache(got["tokens"], names_filter="blocks.1.hook_resid_post")
    # bfloat16 keeps 8 significant bits: 2^-8 of the largest value
    assert rel_err(got["blocks.1.hook_resid_post"].float(), want["blocks.1.hook_resid_post"]) <= 2 ** -8


def test_harvest_runs_the_model_once_per_batch(tmp_path):
    """No separate probe pass for the shapes: shard 0's first batch gives them, and
    its activations are the ones stored."""
    model = oracle_model("gpt2")
    calls = []
    handle = model.graph_module.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape)))
    try:
        index = fxlens.harvest(model, corpus(), SITES, out_dir=tmp_path, seq_len=16, batch_size=3,
                               shard_rows=3, max_tokens=16 * 7, progress=False)
    finally:
        handle.remove()
    assert index["rows"] == 7 and len(index["shards"]) == 3
    assert calls == [(3, 16)] * 3            # 7 rows: 3 batches, the last padded to 3 rows
    assert index["shapes"]["blocks.1.attn.hook_pattern"] == [4, 16, 16]
    _, got = load_shards(tmp_path)
    _, want = model.run_with_cache(got["tokens"], names_filter=SITES)
    for name in SITES:
        assert rel_err(got[name], want[name]) <= RTOL, name


class Interrupted(Exception):
    pass


def test_interrupted_harvest_resumes_without_losing_or_repeating_rows(tmp_path, monkeypatch):
    import fxlens.tools.harvesting as h

    model = oracle_model("gpt2")
    texts = corpus(80, seed=1)
    kwargs = dict(seq_len=16, batch_size=2, shard_rows=4, progress=False)
    fxlens.harvest(model, texts, SITES, out_dir=tmp_path / "whole", **kwargs)
    whole = shard_tensors(tmp_path / "whole")
    assert len(whole) >= 5

    write = h.write_shard
    calls = []

    def dies_in_third_write(path, tensors, plan, rows):
        calls.append(path.name)
        if len(calls) == 3:                    # killed mid-write: a partial temporary file
            path.with_name(path.name + ".tmp").write_bytes(b"partial")
            raise Interrupted
        write(path, tensors, plan, rows)

    monkeypatch.setattr(h, "write_shard", dies_in_third_write)
    with pytest.raises(Interrupted):
        fxlens.harvest(model, texts, SITES, out_dir=tmp_path / "cut", **kwargs)
    assert sorted(p.name for p in (tmp_path / "cut").glob("shard-*.safetensors")) == calls[:2]
    assert not (tmp_path / "cut" / "index.json").exists()

    calls.clear()
    monkeypatch.setattr(h, "write_shard", lambda *a: (calls.append(a[0].name), write(*a)))
    index = fxlens.harvest(model, texts, SITES, out_dir=tmp_path / "cut", **kwargs)
    assert calls == sorted(whole)[2:]          # the two whole shards were not redone
    resumed = shard_tensors(tmp_path / "cut")
    assert resumed.keys() == whole.keys() and index["rows"] == sum(len(t["row_index"]) for t in whole.values())
    for shard, tensors in whole.items():
        for k, t in tensors.items():
            assert torch.equal(resumed[shard][k], t), (shard, k)
    assert not list((tmp_path / "cut").glob("*.tmp"))

    # the same folder with other sites is another harvest: refused, nothing overwritten
    with pytest.raises(fxlens.HarvestError, match="another harvest .*sites"):
        fxlens.harvest(model, texts, ["hook_embed"], out_dir=tmp_path / "cut", **kwargs)
    # ... and so is a changed corpus
    with pytest.raises(fxlens.HarvestError, match="other tokens"):
        fxlens.harvest(model, texts[::-1], SITES, out_dir=tmp_path / "cut", **kwargs)


def test_harvest_cli_bad_input_is_one_line(tmp_path, capsys):
    code = main(["harvest", GPT2, "--text", str(tmp_path / "missing.txt"), "--names", "hook_embed",
                 "--seq-len", "16", "--batch-size", "2", "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("fxlens: --text") and "no such file" in err and "\n" not in err
    with pytest.raises(fxlens.HarvestError, match="name at least one site"):
        fxlens.harvest(oracle_model("gpt2"), ["a b"], [], out_dir=tmp_path, seq_len=4, batch_size=1)


# --- data parallel ----------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def test_two_gloo_ranks_under_torchrun_equal_one_process(tmp_path):
    texts = corpus(70, seed=2)
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    out = tmp_path / "dp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "fxlens", "harvest", GPT2, "--text", str(jsonl),
           "--names", "hook_embed", "--names", "blocks.0.hook_resid_post", "blocks.1.attn.hook_pattern",
           "--seq-len", "16", "--batch-size", "2", "--shard-rows", "4", "-o", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=240)
    finally:
        if proc.poll() is None:                 # a hung rendezvous: end the whole group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    assert "2 ranks" in log

    # the same harvest in this process, one thread as each torchrun rank has (the fixture)
    single = fxlens.harvest(oracle_model("gpt2"), jsonl, SITES, out_dir=tmp_path / "one", seq_len=16,
                            batch_size=2, shard_rows=4, progress=False)
    index = json.loads((out / "index.json").read_text())
    assert index["world_size"] == 2 and index["sites"] == SITES and index["rows"] == single["rows"]
    assert [s["rows"] for s in index["shards"]] == [s["rows"] for s in single["shards"]]
    # rank r wrote shards r, r + 2, ...
    assert [s["rank"] for s in index["shards"]] == [i % 2 for i in range(len(index["shards"]))]
    dp, one = shard_tensors(out), shard_tensors(tmp_path / "one")
    assert dp.keys() == one.keys() and len(dp) >= 4
    for shard, tensors in one.items():
        assert tensors.keys() == dp[shard].keys()
        for k, t in tensors.items():
            assert torch.equal(dp[shard][k], t), (shard, k)   # bit for bit
