"""Pipeline stages: the instrumented graph cut at block boundaries, one stage per
rank, run by `torch.distributed.pipelining` with microbatches.

    # torchrun --nproc-per-node 2 script.py   (script.py, on every rank:)
    model = fxlens.from_pretrained(path, pipeline_stages=2)
    logits, cache = model.run_with_cache(tokens)      # logits and the whole cache on every rank
    model.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_post", fn)])

Cut (`split_stages`): blocks are dealt out in contiguous runs (block L to stage
L * K // n_layers). Every node that depends on the residual stream (reads a
hook's or another such node's value) belongs to the stage of the latest value
it reads, and each hook node to the stage owning its block (sites before the
first block: stage 0; ln_final and the unembedding: the stage of their input,
the last). Nodes that read only the inputs and weights (masks, rotary tables,
position ids) are recomputed by each stage that needs them, so what crosses a
stage boundary is the residual stream (and whatever else a later stage reads:
the token ids and the mask are passed along). Each stage is a GraphModule over
its own nodes: it holds its blocks' weights and calls the model's HookPoints.

    stage 0        (input_ids, mask)         -> (resid, input_ids, mask)
    stage s        (resid, input_ids, mask)  -> (resid, input_ids, mask)
    stage K-1      (resid, input_ids, mask)  -> logits

Run (`StageRunner`): `torch.distributed.pipelining.PipelineStage` (the manual
frontend, with static shapes read from the graph's `meta["val"]`, so no stage
runs an extra shape-inference forward that hooks would see) under
`ScheduleGPipe`. A call is cut into microbatches along the batch; each stage's
hooks run on its rank, once per microbatch, on that microbatch's rows. The
logits are broadcast from the last rank and each rank's cached sites are
gathered, so every rank returns what one process would. Backward hooks, loss
gradients, `compile()` and `generate()` are not pipelined (NotApplicableError).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.fx as fx

from fxlens.errors import NotApplicableError, PipelineError
from fxlens.runtime.model import HookedModel


def _is_hook(n: fx.Node) -> bool:
    return n.op == "call_module" and "fxlens.site" in n.meta


def block_stages(n_layers: int, n_stages: int) -> list[int]:
    """Stage of each block: contiguous runs, as even as the count allows."""
    if not 1 <= n_stages <= n_layers:
        raise PipelineError(f"pipeline_stages={n_stages}: a stage needs at least one block and this model "
                            f"has {n_layers}; use 1..{n_layers} stages")
    return [layer * n_stages // n_layers for layer in range(n_layers)]


def _site_stage(site: str, of_block: list[int]) -> int | None:
    parts = site.split(".")
    if parts[0] == "blocks" and len(parts) > 1 and parts[1].isdigit():
        return of_block[int(parts[1])]
    return None


def assign_stages(graph: fx.Graph, of_block: list[int]) -> dict[fx.Node, int]:
    """{node: stage} for every hook and every node downstream of one; the nodes
    left out depend on the inputs and weights alone (recomputed where needed)."""
    stage: dict[fx.Node, int] = {}
    for n in graph.nodes:
        if n.op in ("placeholder", "get_attr", "output"):
            continue
        ins = [stage[a] for a in n.all_input_nodes if a in stage]
        if _is_hook(n):
            own = _site_stage(n.meta["fxlens.site"], of_block)
            if own is not None and ins and max(ins) > own:
                raise PipelineError(f"{n.meta['fxlens.site']} reads a value of stage {max(ins)} but its block "
                                    f"is in stage {own}: this graph's blocks do not run in order; load it "
                                    f"without pipeline_stages")
            stage[n] = own if own is not None else max(ins, default=0)
        elif ins:
            stage[n] = max(ins)
    return stage


def _is_tensor(n: fx.Node) -> bool:
    return isinstance(n.meta.get("val"), torch.Tensor)


@dataclass
class Stage:
    """One stage's graph and what crosses into and out of it (nodes of the full graph)."""

    index: int
    gm: fx.GraphModule
    inputs: list[fx.Node]       # placeholders of the full graph (stage 0), else values received
    outputs: list[fx.Node]      # values sent on (empty for the last stage: it returns the logits)
    blocks: list[int]


def split_stages(gm: fx.GraphModule, n_layers: int, n_stages: int) -> list[Stage]:
    """The K stage graphs of `gm` (see the module docstring). Each shares `gm`'s
    weights and HookPoints."""
    graph = gm.graph
    of_block = block_stages(n_layers, n_stages)
    stage = assign_stages(graph, of_block)
    order = {n: i for i, n in enumerate(graph.nodes)}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    output = next(n for n in graph.nodes if n.op == "output")
    for s in range(n_stages):
        if s not in stage.values():
            raise PipelineError(f"stage {s} owns no node of the graph; use fewer pipeline_stages")

    stages: list[Stage] = []
    roots: list[fx.Node] = list(output.all_input_nodes)     # what the stage being built must produce
    for s in reversed(range(n_stages)):
        body: set[fx.Node] = set()
        inputs: set[fx.Node] = set()

        def visit(n: fx.Node) -> None:
            if n in body or n in inputs:
                return
            if n.op == "placeholder":
                (body if s == 0 else inputs).add(n)
                return
            at = stage.get(n)
            if at is not None and at > s:
                raise PipelineError(f"{n.name} (stage {at}) feeds stage {s}: the graph's stages are out of order")
            if at is not None and at < s and n.op != "get_attr" and _is_tensor(n):
                inputs.add(n)        # computed upstream: received
                return
            body.add(n)              # this stage's own, or recomputed here (inputs and weights only)
            for a in n.all_input_nodes:
                visit(a)

        for r in roots:
            visit(r)
        if s == 0:
            inputs = set(placeholders)
        ins = sorted(inputs, key=order.__getitem__)
        for n in ins:
            if s > 0 and not _is_tensor(n):
                raise PipelineError(f"{n.name} crosses into stage {s} but has no tensor value recorded "
                                    f"(meta['val']); load without pipeline_stages")
        g = fx.Graph()
        env: dict[fx.Node, fx.Node] = {}
        for i, n in enumerate(ins):
            env[n] = g.node_copy(n) if s == 0 else g.placeholder(f"in_{i}_{n.name}")
            env[n].meta = dict(n.meta)
        for n in graph.nodes:
            if n in body and n.op != "placeholder":
                env[n] = g.node_copy(n, env.__getitem__)
        if s == n_stages - 1:
            g.node_copy(output, env.__getitem__)
            outs: list[fx.Node] = []
        else:
            outs = list(roots)
            g.output(tuple(env[r] for r in outs))
        g.lint()
        stage_gm = fx.GraphModule(gm, g, class_name=f"FxlensStage{s}")
        stages.append(Stage(s, stage_gm, ins, outs, [b for b, at in enumerate(of_block) if at == s]))
        roots = ins
    return stages[::-1]


# --- running ---------------------------------------------------------------------------

def _shape_at(val: torch.Tensor, env: dict) -> list[int]:
    """A recorded symbolic shape at this call's sizes (batch and sequence length)."""
    out = []
    for d in val.shape:
        if isinstance(d, torch.SymInt):
            expr = d.node.expr.xreplace(env)     # a bare symbol comes back as the int itself
            if not isinstance(expr, int) and not expr.is_number:
                raise PipelineError(f"a stage boundary value has shape {list(val.shape)}, which depends on "
                                    f"more than the batch size and length; load without pipeline_stages")
            out.append(int(expr))
        else:
            out.append(int(d))
    return out


def _example(val: torch.Tensor, env: dict, device) -> torch.Tensor:
    return torch.empty(_shape_at(val, env), dtype=val.dtype, device=device)


@dataclass(frozen=True)
class PipelineInfo:
    """Where things run: `stage_of_block[L]` is the rank owning block L."""

    rank: int
    world_size: int
    stage_of_block: tuple[int, ...]
    microbatches: int

    def rank_of(self, name: str) -> int:
        """The rank whose hooks see site `name`."""
        own = _site_stage(name, list(self.stage_of_block))
        if own is not None:
            return own
        return self.world_size - 1 if name.startswith(("ln_final", "unembed")) else 0


class StageRunner:
    """This rank's stage and the schedule that runs it (one per call shape)."""

    def __init__(self, stages: list[Stage], rank: int, device: torch.device, microbatches: int):
        self.stages = stages
        self.stage = stages[rank]
        self.rank, self.size = rank, len(stages)
        self.device = device
        self.microbatches = microbatches
        self.stage.gm.to(device)        # this rank's weights only (the others stay where they were loaded)
        first = stages[0].inputs
        self.takes_mask = len(first) > 1
        tokens_val = first[0].meta["val"]
        self._batch_sym, self._seq_sym = (d.node.expr if isinstance(d, torch.SymInt) else None
                                          for d in tokens_val.shape)
        out_node = next(n for n in stages[-1].gm.graph.nodes if n.op == "output")
        self._logits_val = out_node.all_input_nodes[0].meta.get("val")
        self._schedules: dict[tuple, object] = {}

    def _env(self, batch: int, seq: int) -> dict:
        return {k: v for k, v in ((self._batch_sym, batch), (self._seq_sym, seq)) if k is not None}

    def _schedule(self, mb: int, seq: int, n_mb: int):
        key = (mb, seq, n_mb)
        sched = self._schedules.get(key)
        if sched is None:
            from torch.distributed.pipelining import PipelineStage, ScheduleGPipe

            env = self._env(mb, seq)
            st = self.stage
            ins = tuple(_example(n.meta["val"], env, self.device) for n in st.inputs)
            outs = (_example(self._logits_val, env, self.device),) if st.index == self.size - 1 else \
                tuple(_example(n.meta["val"], env, self.device) for n in st.outputs)
            stage = PipelineStage(st.gm, st.index, self.size, self.device, input_args=ins, output_args=outs)
            sched = self._schedules[key] = ScheduleGPipe(stage, n_mb)
        return sched

    def n_microbatches(self, batch: int) -> int:
        """The largest count <= microbatches that divides the batch (equal chunks: one static shape)."""
        return max(m for m in range(1, min(self.microbatches, batch) + 1) if batch % m == 0)

    def run(self, tokens: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Logits [batch, pos, d_vocab] on every rank. Collective: every rank calls it with
        the same tokens."""
        import torch.distributed as dist

        batch, seq = tokens.shape
        n_mb = self.n_microbatches(batch)
        sched = self._schedule(batch // n_mb, seq, n_mb)
        args = (tokens, torch.ones_like(tokens) if mask is None else mask) if self.takes_mask else (tokens,)
        with torch.no_grad():
            if self.rank == 0:
                out = sched.step(*(a.to(self.device) for a in args))
            else:
                out = sched.step()
            if self.size > 1:
                if self.rank != self.size - 1:
                    out = _example(self._logits_val, self._env(batch, seq), self.device)
                dist.broadcast(out, src=self.size - 1)
        return out

    def gather(self, own: dict) -> dict:
        """Every rank's cached sites, on every rank."""
        import torch.distributed as dist

        if self.size == 1:
            return own
        everyone: list = [None] * self.size
        dist.all_gather_object(everyone, {k: v.cpu() for k, v in own.items()})
        merged = {}
        for part in everyone:
            merged.update({k: v.to(self.device) for k, v in part.items()})
        return merged


class PipelinedModel(HookedModel):
    """A HookedModel whose calls run as pipeline stages over the ranks of a
    torchrun world (see the module docstring). `model.pipeline` says which rank
    holds which blocks."""

    _runner: StageRunner | None = None
    pipeline: PipelineInfo | None = None

    def place_stages(self, n_stages: int, device=None, microbatches: int | None = None) -> "PipelinedModel":
        """Cut the graph into `n_stages` stages and keep this rank's (its weights moved
        to `device`: default the rank's GPU, else the CPU). Collective setup: every
        rank of the torchrun world calls it."""
        rank, size = join_world(n_stages)
        device = torch.device(device) if device is not None else default_device()
        microbatches = microbatches or n_stages
        if microbatches < 1:
            raise PipelineError(f"pipeline_microbatches={microbatches}: use 1 or more")
        stages = split_stages(self.graph_module, self.cfg.n_layers, n_stages)
        self._runner = StageRunner(stages, rank, device, microbatches)
        self.pipeline = PipelineInfo(rank, size, tuple(block_stages(self.cfg.n_layers, n_stages)), microbatches)
        self.cfg.device = str(device)
        return self

    def _run(self, tokens, cache_names=(), mask=None):
        if self._has_bwd_hooks():
            raise NotApplicableError("backward hooks are not pipelined: the stages run forward only; "
                                     "load without pipeline_stages to take gradients")
        return self._run_eager(tokens, cache_names, mask)

    def _call_graph(self, tokens, mask=None):
        if not self._covers(tokens):
            raise PipelineError(f"the captured graph does not cover inputs of shape {list(tokens.shape)} "
                                f"and pipeline stages run that graph only; pass inputs of another length "
                                f"or load without pipeline_stages")
        return self._runner.run(tokens, mask)

    @contextlib.contextmanager
    def _caching(self, names):
        """As HookedModel's, per microbatch: each site's microbatches are joined along
        the batch, then every rank's sites are gathered onto every rank."""
        parts: dict[str, list[torch.Tensor]] = {}
        store: dict[str, torch.Tensor] = {}

        def save(tensor, hook):
            parts.setdefault(hook.name, []).append(tensor.detach())

        with self.hooks(fwd_hooks=[(n, save) for n in names]):
            yield store
        own = {k: v[0] if len(v) == 1 else torch.cat(v) for k, v in parts.items()}
        store.update(self._runner.gather(own))

    def _forward_backward(self, model_args, model_kwargs, names):
        raise NotApplicableError("run_with_cache(incl_bwd=True) is not pipelined: the stages run forward "
                                 "only; load without pipeline_stages to take gradients")

    def compile(self, **kwargs):
        raise NotApplicableError("compile() with pipeline stages is not supported yet: each stage runs its "
                                 "eager graph; load without pipeline_stages to compile")

    def generate(self, *args, **kwargs):
        raise NotApplicableError("generate() is not pipelined (each new token would be a pipeline call); "
                                 "load without pipeline_stages to generate")


def join_world(n_stages: int) -> tuple[int, int]:
    """(rank, world size), initialising torch.distributed from torchrun's variables
    where the caller has not (gloo on CPU, NCCL on CUDA)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise PipelineError(f"pipeline_stages={n_stages} runs one stage per process: launch with "
                                f"`torchrun --nproc-per-node {n_stages} script.py` (RANK / WORLD_SIZE unset)")
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    if size != n_stages:
        raise PipelineError(f"pipeline_stages={n_stages} but torchrun started {size} processes; pass "
                            f"--nproc-per-node {n_stages} (over all machines: --nnodes x --nproc-per-node)")
    return rank, size


def default_device() -> torch.device:
    """The rank's GPU (LOCAL_RANK) where there is one, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")
