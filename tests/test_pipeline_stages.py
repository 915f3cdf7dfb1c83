"""Pipeline stages (issue 12.3): the instrumented graph cut at block boundaries,
one stage per rank under torchrun (2 gloo ranks on the CPU): logits, every cached
site and a hook's edit on a rank-1 block equal the single-process model."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxlens
from conftest import DATA, captured, oracle_model, rel_err
from fxlens.errors import PipelineError
from fxlens.runtime.stages import assign_stages, block_stages, split_stages

ARCHS = ["llama"]      # rotary tables and the causal mask are recomputed by each stage
WORKER = Path(__file__).parent / "pipeline_worker.py"
# The stages run the same ATen ops on the same values as the whole graph, but each
# microbatch is its own matmul (2 rows instead of 4): BLAS may block the reduction
# differently, ~1e-7 of a float32 activation. 1e-5 of the largest value separates that
# from a wrong cut (a missing block or hook edit moves values by O(1)).
RTOL = 1e-5


def close(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Equal shapes, -inf (masked scores) at the same places, the rest within RTOL."""
    return got.shape == want.shape and torch.equal(got.isinf(), want.isinf()) and rel_err(got, want) <= RTOL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """{arch: [rank 0's results, rank 1's]} from one torchrun of the worker."""
    out = tmp_path_factory.mktemp("stages")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), str(WORKER), str(out), *ARCHS]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        log = "timed out after 60 s"
    finally:
        if proc.poll() is None:                 # a hung rendezvous or pipeline: end the whole group
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, log[-3000:]
    return {a: [torch.load(out / f"rank{r}-{a}.pt") for r in range(2)] for a in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_two_stages_equal_one_process(ranks, arch):
    model = fxlens.from_pretrained(captured(arch))      # the worker's model, captured here
    tokens = torch.randint(0, model.cfg.d_vocab, (4, 9), generator=torch.Generator().manual_seed(0))
    logits, cache = model.run_with_cache(tokens)
    last = model.cfg.n_layers - 1
    hooked = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", lambda x, hook: x * 2.0)])
    mask = torch.ones_like(tokens)
    mask[1, :3] = 0
    padded = model(tokens, attention_mask=mask)
    assert not close(hooked, logits)               # the edit matters
    for rank, got in enumerate(ranks[arch]):       # every rank holds what one process gives
        assert close(got["logits"], logits), rank
        assert list(got["cache"]) == list(cache.cache_dict) == model.hook_names
        for name, want in cache.cache_dict.items():
            assert close(got["cache"][name], want), (rank, name)
        assert close(got["hooked"], hooked), rank
        assert close(got["padded"], padded), rank
    # the hook ran on rank 1 only (block `last` is its), once per microbatch of 2 rows
    assert ranks[arch][0]["calls"] == []
    assert ranks[arch][1]["calls"] == [(1, f"blocks.{last}.hook_mlp_out", 2)] * 2
    owners = ranks[arch][0]["rank_of"]
    assert owners["blocks.0.hook_resid_pre"] == 0 and owners[f"blocks.{last}.hook_resid_post"] == 1
    assert owners["hook_embed"] == 0 and owners["ln_final.hook_normalized"] == 1


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_stages_chained_in_one_process_equal_the_graph(arch):
    """The cut alone: K stage graphs called in turn give the whole graph's logits bit
    for bit, each hook lies in exactly one stage, that of its block, and only the
    residual stream (plus the token ids and mask) crosses a boundary."""
    model = oracle_model(arch)
    gm, n = model.graph_module, model.cfg.n_layers
    ids = torch.randint(0, model.cfg.d_vocab, (2, 7), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    want = gm(ids, mask)
    for k in range(1, n + 1):
        stages = split_stages(gm, n, k)
        x = stages[0].gm(ids, mask)
        for st in stages[1:]:
            x = st.gm(*x)
        assert torch.equal(x, want), k
        of_block = block_stages(n, k)
        seen = []
        for st in stages:
            sites = [m.meta["fxlens.site"] for m in st.gm.graph.nodes if m.op == "call_module"]
            seen += sites
            for site in sites:
                if site.startswith("blocks."):
                    assert of_block[int(site.split(".")[1])] == st.index, (k, site)
            if st.index:
                assert [m.name for m in st.inputs] == ["input_ids", "attention_mask",
                                                       f"fxlens_hooks_blocks__{st.blocks[0] - 1}__hook_resid_post"]
        assert sorted(seen) == sorted(model.hook_names)
    assert block_stages(3, 2) == [0, 0, 1] and len(assign_stages(gm.graph, [0, 0, 1])) > 0
    with pytest.raises(PipelineError, match="at least one block"):
        split_stages(gm, n, n + 1)


def test_without_torchrun_the_error_says_how_to_launch(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(PipelineError, match="torchrun --nproc-per-node 2"):
        fxlens.from_pretrained(DATA / "models" / "gpt2", pipeline_stages=2)
