"""One rank of tests/test_pipeline_stages.py, run under torchrun: each model as 2
pipeline stages; every rank saves what it got to OUT/rank{r}-{arch}.pt."""

import sys
from pathlib import Path

import torch
import torch.distributed as dist

import fxlens

DATA = Path(__file__).parent / "data"


def edit(x, hook):
    """An edit a rank-1 block makes (position-wise, so any microbatching gives the same)."""
    edit.calls.append((dist.get_rank(), hook.name, x.shape[0]))
    return x * 2.0


edit.calls = []


def main(out: Path, archs: list[str]) -> None:
    for arch in archs:
        model = fxlens.from_pretrained(DATA / "models" / arch, pipeline_stages=2)
        tokens = torch.randint(0, model.cfg.d_vocab, (4, 9), generator=torch.Generator().manual_seed(0))
        logits, cache = model.run_with_cache(tokens)
        last = model.cfg.n_layers - 1
        edit.calls = []
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(f"blocks.{last}.hook_mlp_out", edit)])
        mask = torch.ones_like(tokens)
        mask[1, :3] = 0                                   # row 1 left-padded
        padded = model(tokens, attention_mask=mask)
        torch.save({"logits": logits, "cache": dict(cache.cache_dict), "hooked": hooked, "padded": padded,
                    "calls": edit.calls, "rank_of": {n: model.pipeline.rank_of(n) for n in model.hook_names}},
                   out / f"rank{dist.get_rank()}-{arch}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
