"""SAELens sparse autoencoders spliced into a site, as SAELens's HookedSAETransformer does.

`model.add_sae(sae)` attaches a `sae_lens.SAE` (any architecture: SAELens's own
`encode`/`decode` run it) to the HookPoint of `sae.cfg.metadata.hook_name`. The
HookPoint then passes the activation (TransformerLens layout) through the SAE:
downstream sees the reconstruction, or with `use_error_term=True` the
reconstruction plus the error `activation - reconstruction` (computed again
with the SAE's hooks off, so a feature edit moves the output by exactly its
decoded change). The site's own hooks run after the SAE, on what flows on, so
`cache[site]` equals `cache[site + ".hook_sae_output"]`.

The SAE's sites are hook points of the model, under SAELens's names
`<site>.hook_sae_input`, `.hook_sae_acts_pre`, `.hook_sae_acts_post`,
`.hook_sae_recons`, `.hook_sae_error`, `.hook_sae_output`: they are in
`model.hook_dict`, `run_with_cache` returns them, and hooks on them edit the
SAE's values (ablate or clamp a feature). Each of the SAE's own (TransformerLens)
hook points forwards to the fxlens hook point of that name through a torch
forward hook, placed while the SAE is attached: SAELens's code decides where
each site is, so every architecture's sites are where SAELens puts them.

Compiled models run the SAE (and the hooks on its sites) as Python between the
compiled segments, like any hooked site (`hooks="python"`); with
`hooks="traced"` dynamo traces the SAE into the variant where it can, and the
call runs eagerly otherwise (CompileFallbackWarning).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

from fxlens.errors import SAEError, UnknownHookError
from fxlens.ir.hook_points import HookPoint
from fxlens.discovery.names import SAE_SITES

# the sites the splice itself calls (SAELens's wrapper makes its own as well):
# the error term exists only with use_error_term, the output is what flows on
_OWN = ("hook_sae_error", "hook_sae_output")


def _sae_lens():
    try:
        import sae_lens
        from sae_lens.saes.sae import _disable_hooks
    except ImportError as exc:
        raise SAEError(f"SAEs need SAELens ({exc}); install it with `pip install fxlens[sae]`") from exc
    return sae_lens, _disable_hooks


class SAESplice(nn.Module):
    """The SAE at one site: its hook points (children, so the model lists them) and
    the bridges from the SAE's own hook points to them. The SAE itself is kept out
    of the module tree (as SAELens's wrapper does): its weights are not the model's."""

    def __init__(self, site: str, sae, use_error_term: bool):
        super().__init__()
        self.__dict__["sae"] = sae
        self.site = site
        self.use_error_term = bool(use_error_term)
        names = [n for n in sae.hook_dict if "." not in n]
        for name in (*names, *(n for n in _OWN if n not in names)):
            hp = HookPoint(f"{site}.{name}")
            hp.in_graph = False
            self.add_module(name, hp)
        self._handles = []

    def attach(self) -> None:
        for name, sae_hp in self.sae.hook_dict.items():
            if name in _OWN or name not in self._modules:
                continue
            ours = self._modules[name]
            self._handles.append(sae_hp.register_forward_hook(lambda mod, args, out, hp=ours: hp(out)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        _, disable_hooks = _sae_lens()
        width = x.shape[-2] * x.shape[-1] if getattr(sae, "hook_z_reshaping_mode", False) else x.shape[-1]
        if width != sae.cfg.d_in:
            raise SAEError(f"the SAE at {self.site} takes d_in={sae.cfg.d_in}; the site's activation is "
                           f"{tuple(x.shape)} (width {width}). Attach an SAE trained on this model's "
                           f"{self.site}")
        out = sae.decode(sae.encode(x))
        if self.use_error_term:
            with torch.no_grad():
                with disable_hooks(sae):   # the error of the unedited SAE, as SAELens computes it
                    clean = sae.decode(sae.encode(x))
                out = out + self.hook_sae_error(x - clean)
        out = self.hook_sae_output(out)
        if out.shape != x.shape:
            raise SAEError(f"the SAE at {self.site} returned {tuple(out.shape)} for an activation "
                           f"{tuple(x.shape)}")
        return out.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{type(self.sae).__name__}(d_in={self.sae.cfg.d_in}, d_sae={self.sae.cfg.d_sae}), " \
               f"use_error_term={self.use_error_term}"


class SAEMixin:
    """add_sae / reset_saes / saes() on HookedModel (SAELens's HookedSAETransformer API)."""

    @property
    def acts_to_saes(self) -> dict:
        """Site name -> the SAE attached there."""
        return {hp.name: hp.sae_splice.sae for hp in self.hook_dict.values()
                if hp.in_graph and hp.sae_splice is not None}

    def add_sae(self, sae, use_error_term: bool | None = None) -> None:
        """Splice `sae` (a `sae_lens.SAE`) at `sae.cfg.metadata.hook_name`, replacing any
        SAE there. `use_error_term=None` keeps the SAE's own setting."""
        sae_lens, _ = _sae_lens()
        if not isinstance(sae, sae_lens.SAE):
            raise SAEError(f"add_sae takes a sae_lens.SAE, not {type(sae).__name__}")
        meta = sae.cfg.metadata
        site = meta.hook_name
        out_site = getattr(meta, "hook_name_out", None)
        if out_site and out_site != site:
            raise SAEError(f"{type(sae).__name__} reads {site} and writes {out_site} (a transcoder); "
                           f"fxlens splices SAEs that read and write one site")
        try:
            hp = self._hook_point(site)
        except (UnknownHookError, TypeError) as exc:
            raise SAEError(f"the SAE's hook_name {site!r} is not a site of this model; "
                           f"`model.hook_names` lists them") from exc
        if not hp.in_graph:
            raise SAEError(f"{site} is a site of an attached SAE; splice SAEs at the model's sites")
        self._drop_sae(hp)
        splice = SAESplice(site, sae, sae.use_error_term if use_error_term is None else use_error_term)
        splice.attach()
        hp.sae_splice = splice
        self._saes_changed()

    def reset_saes(self, act_names: str | Iterable[str] | None = None) -> None:
        """Remove the SAEs at `act_names` (default: all of them)."""
        names = list(self.acts_to_saes) if act_names is None else \
            [act_names] if isinstance(act_names, str) else list(act_names)
        for name in names:
            if name in self.hook_dict:
                self._drop_sae(self.hook_dict[name])
        self._saes_changed()

    @contextlib.contextmanager
    def saes(self, saes=(), reset_saes_end: bool = True, use_error_term: bool | None = None):
        """`with model.saes([sae, ...]):` -- the SAEs are spliced for the block; on exit
        each site gets back what it had (no SAE, or the SAE attached before)."""
        sae_lens, _ = _sae_lens()
        saes = [saes] if isinstance(saes, sae_lens.SAE) else list(saes)
        before = []
        try:
            for sae in saes:
                site = sae.cfg.metadata.hook_name
                hp = self.hook_dict.get(site)
                prev = hp.sae_splice if hp is not None else None
                before.append((site, None if prev is None else (prev.sae, prev.use_error_term)))
                self.add_sae(sae, use_error_term=use_error_term)
            yield self
        finally:
            if reset_saes_end:
                for site, prev in reversed(before):
                    self.reset_saes(site)
                    if prev is not None:
                        self.add_sae(prev[0], use_error_term=prev[1])

    def run_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                      use_error_term: bool | None = None, **model_kwargs):
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self(*model_args, **model_kwargs)

    def run_with_cache_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 use_error_term: bool | None = None, **kwargs):
        with self.saes(saes, reset_saes_end=reset_saes_end, use_error_term=use_error_term):
            return self.run_with_cache(*model_args, **kwargs)

    def run_with_hooks_with_saes(self, *model_args, saes=(), reset_saes_end: bool = True,
                                 fwd_hooks=(), bwd_hooks=(), **model_kwargs):
        with self.saes(saes, reset_saes_end=reset_saes_end):
            return self.run_with_hooks(*model_args, fwd_hooks=fwd_hooks, bwd_hooks=bwd_hooks, **model_kwargs)

    # --- bookkeeping ---------------------------------------------------------------
    def _drop_sae(self, hp: HookPoint) -> None:
        if hp.sae_splice is not None:
            hp.sae_splice.detach()
            hp.sae_splice = None

    def _saes_changed(self) -> None:
        # the SAE's sites join (or leave) hook_dict; compiled variants key on the
        # hooked sites, and an SAE site counts as hooked, so none goes stale
        self._refresh_hook_dict()

    def _hooked_sites(self) -> tuple[str, ...]:
        """The graph's sites whose HookPoint must run: hooks (forward or backward) or an SAE on it."""
        return tuple(n for n, hp in self.hook_dict.items()
                     if hp.in_graph and (hp.fwd_hooks or hp.bwd_hooks or hp.sae_splice is not None))

    def _sae_site_names(self, names) -> list[str]:
        return [n for n in names if not self.hook_dict[n].in_graph]


__all__ = ["SAESplice", "SAEMixin", "SAE_SITES"]
