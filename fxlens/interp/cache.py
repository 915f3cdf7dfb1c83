"""ActivationCache: activations by hook name, in TransformerLens's key order,
and TransformerLens's analysis methods over them (residual-stream
decompositions, per-head and per-neuron results, LayerNorm scaling, logit
attribution).

Shapes follow TransformerLens: a *stack* is [component, *batch_and_pos, d_model],
where *batch_and_pos is [batch, pos], [pos] after `remove_batch_dim`, and loses
pos when an int `pos_slice` picks one position.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import torch

from fxlens.discovery.config import PerLayer
from fxlens.errors import FxlensError, NotApplicableError, UnknownHookError
from fxlens.discovery.names import act_name, canonical_order

_NORMS = ("LN", "LNPre", "RMS", "RMSPre")


def apply_slice(x: torch.Tensor, s, dim: int = 0) -> torch.Tensor:
    """TransformerLens's `Slice` semantics along `dim`: None keeps all, an int
    picks one (dropping the dim), a tuple is `slice(*t)`, a list / tensor /
    array picks those indices; a TransformerLens `Slice` object is applied as is."""
    if s is None:
        return x
    if hasattr(s, "apply"):
        return s.apply(x, dim=dim)
    if isinstance(s, tuple):
        s = slice(*s)
    elif isinstance(s, (list, np.ndarray)):
        s = torch.as_tensor(np.asarray(s), device=x.device)
    elif isinstance(s, torch.Tensor):
        s = s.to(x.device)
    elif not isinstance(s, (int, slice)):
        raise TypeError(f"a slice is None, an int, a tuple, a slice, or a list/tensor of indices; "
                        f"got {type(s).__name__}")
    index = [slice(None)] * x.ndim
    index[dim] = s
    return x[tuple(index)]


def _token_shape(tokens) -> tuple:
    return () if isinstance(tokens, (str, int)) else tuple(torch.as_tensor(tokens).shape)


class ActivationCache:
    def __init__(self, cache_dict: dict[str, torch.Tensor], model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    # --- a dict of activations ----------------------------------------------------------
    def _key(self, key) -> str:
        if isinstance(key, tuple):
            # a negative layer counts from the end, as TransformerLens: ("resid_pre", -1)
            if len(key) > 1 and isinstance(key[1], int) and key[1] < 0:
                key = (key[0], self.model.cfg.n_layers + key[1], *key[2:])
            return act_name(*key)
        return act_name(key) if isinstance(key, str) else key

    def __getitem__(self, key) -> torch.Tensor:
        name = self._key(key)
        if name not in self.cache_dict:
            raise UnknownHookError(name, list(self.cache_dict))
        return self.cache_dict[name]

    def __contains__(self, key) -> bool:
        return self._key(key) in self.cache_dict

    def __len__(self) -> int:
        return len(self.cache_dict)

    def __iter__(self) -> Iterator[str]:
        return iter(self.cache_dict)

    def keys(self):
        return self.cache_dict.keys()

    def values(self):
        return self.cache_dict.values()

    def items(self):
        return self.cache_dict.items()

    def to(self, device, move_model: bool = False) -> "ActivationCache":
        """A cache with every activation on `device` (and the model too with
        `move_model`, TransformerLens's deprecated option)."""
        if move_model:
            self.model.to(device)
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()},
                               self.model, self.has_batch_dim)

    def toggle_autodiff(self, mode: bool = False) -> None:
        """TransformerLens's global `torch.set_grad_enabled(mode)` (it changes torch's
        global state; `with torch.no_grad():` does the same for a block)."""
        warnings.warn(f"toggle_autodiff: torch's global grad mode is now {mode}", stacklevel=2)
        torch.set_grad_enabled(mode)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim: {k} has batch size {v.shape[0]}; it needs 1")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, False)

    def apply_slice_to_batch_dim(self, batch_slice) -> "ActivationCache":
        """The cache with `batch_slice` applied to every activation's batch dim
        (an int slice removes the batch dim)."""
        if not self.has_batch_dim:
            if batch_slice is None:
                return self
            raise ValueError("apply_slice_to_batch_dim: this cache has no batch dim")
        keeps_batch = not isinstance(batch_slice, int)
        return ActivationCache({k: apply_slice(v, batch_slice, 0) for k, v in self.cache_dict.items()},
                               self.model, keeps_batch)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"

    # --- helpers for the analysis methods -----------------------------------------------
    @property
    def has_embed(self) -> bool:
        return "hook_embed" in self.cache_dict

    @property
    def has_pos_embed(self) -> bool:
        return "hook_pos_embed" in self.cache_dict

    @property
    def _cfg(self):
        return self.model.cfg

    def _layer(self, layer: int | None) -> int:
        """None and -1 mean 'the unembed', i.e. n_layers; otherwise 0 <= layer <= n_layers."""
        n = self._cfg.n_layers
        if layer is None or layer == -1:
            return n
        if not 0 <= layer <= n:
            raise ValueError(f"layer={layer}; it is in [0, {n}] (or -1 / None for the unembed)")
        return layer

    @property
    def _parallel(self) -> bool:
        # attention and MLP both read resid_pre: there is no resid_mid, and the
        # MLP's input does not contain this layer's attention output
        return bool(self._cfg.parallel_attn_mlp)

    @property
    def _has_mlp(self) -> bool:
        return not getattr(self._cfg, "attn_only", False) and self._cfg.d_mlp is not None

    def _sublayers(self, layer: int) -> tuple[str | None, bool]:
        """What block `layer` adds to the stream: its token mixer's output ("attn_out",
        or "mixer_out" for a state-space / linear-attention layer; None for an
        MLP-only layer), and whether it has an MLP (mlp_out)."""
        lc = self._cfg.layers[layer] if layer < len(getattr(self._cfg, "layers", ())) else None
        if lc is None:
            return "attn_out", True
        outs = [s.removeprefix("hook_") for s in lc.sublayer_outputs()]
        return next((s for s in outs if s != "mlp_out"), None), lc.has_mlp

    def _empty_stack(self, pos_slice) -> torch.Tensor:
        """[0, *batch_and_pos, d_model]: a stack with no components."""
        like = apply_slice(self[("resid_pre", 0)], pos_slice, -2)
        return like.new_zeros((0, *like.shape))

    # --- residual stream ---------------------------------------------------------------
    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False,
                          pos_slice=None, mlp_input: bool = False, return_labels: bool = False):
        """The residual stream as it stands before each layer: [resid_pre 0, ...,
        resid_pre `layer`] (plus `{l}_mid` before each earlier MLP with `incl_mid`,
        and this layer's mid with `mlp_input`), ending in `final_post` (the
        input to the unembed) when `layer` is None / -1 / n_layers. For the logit lens.

        `apply_ln`: at the unembed, each entry goes through the final norm with
        its own statistics (TransformerLens >= 3.9), weights included, so
        `stack @ W_U + b_U` gives logits; at an earlier layer, the cached ln1
        (ln2 with `mlp_input`) scale is used, as `apply_ln_to_stack` does.
        Returns [component, *batch_and_pos, d_model] (and labels "0_pre", "0_mid",
        ..., "final_post" with `return_labels`).
        """
        layer = self._layer(layer)
        n = self._cfg.n_layers
        if self._parallel and incl_mid:
            raise FxlensError("accumulated_resid: this model's attention and MLP run in parallel, "
                              "so there is no resid_mid; pass incl_mid=False")
        parts, labels = [], []
        for l in range(layer + 1):
            if l == n:
                parts.append(self[("resid_post", n - 1)])
                labels.append("final_post")
                break
            parts.append(self[("resid_pre", l)])
            labels.append(f"{l}_pre")
            if not self._parallel and ((incl_mid and l < layer) or (mlp_input and l == layer)):
                parts.append(self[("resid_mid", l)])
                labels.append(f"{l}_mid")
        stack = torch.stack([apply_slice(p, pos_slice, -2) for p in parts])
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim, recompute_ln=layer == n)
        return (stack, labels) if return_labels else stack

    def decompose_resid(self, layer: int | None = None, mlp_input: bool = False, mode: str = "all",
                        apply_ln: bool = False, pos_slice=None, incl_embeds: bool = True,
                        return_labels: bool = False):
        """The residual stream entering `layer` as the stack of what wrote it:
        embed, pos_embed (learned positions only), then each earlier layer's
        attn_out and mlp_out; with `mlp_input`, also this layer's attn_out (not in
        parallel attn/MLP blocks, whose MLP reads resid_pre). The stack sums to
        resid_pre `layer` (resid_mid with `mlp_input`; the final resid_post for
        None / -1 / n_layers). `mode`: "all", "attn" or "mlp" keeps those
        outputs. Labels: "embed", "pos_embed", "0_attn_out", "0_mlp_out", ...
        """
        if mode not in ("all", "attn", "mlp"):
            raise ValueError(f"mode={mode!r}; use 'all', 'attn' or 'mlp'")
        layer = self._layer(layer)
        incl_attn, incl_mlp = mode != "mlp", mode != "attn" and self._has_mlp
        parts, labels = [], []
        if incl_embeds:
            for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
                if name in self.cache_dict:
                    parts.append(self[name])
                    labels.append(label)
        for l in range(layer):
            mixer, has_mlp = self._sublayers(l)
            if incl_attn and mixer:
                parts.append(self[(mixer, l)])
                labels.append(f"{l}_{mixer}")
            if incl_mlp and has_mlp:
                parts.append(self[("mlp_out", l)])
                labels.append(f"{l}_mlp_out")
        if mlp_input and incl_attn and not self._parallel:
            if layer == self._cfg.n_layers:
                raise ValueError("decompose_resid: mlp_input=True needs a layer below n_layers")
            mixer, _ = self._sublayers(layer)
            if mixer:
                parts.append(self[(mixer, layer)])
                labels.append(f"{layer}_{mixer}")
        stack = (torch.stack([apply_slice(p, pos_slice, -2) for p in parts]) if parts
                 else self._empty_stack(pos_slice))
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    # --- per-head results -------------------------------------------------------------
    def _head_result(self, layer: int) -> torch.Tensor:
        """[*batch_and_pos, head, d_model]: what each head writes to the residual
        stream (hook_result without b_O), from the cache or computed as z @ W_O."""
        name = f"blocks.{layer}.attn.hook_result"
        if name in self.cache_dict:
            return self.cache_dict[name]
        mixer, _ = self._sublayers(layer)
        if mixer != "attn_out":
            raise FxlensError(f"per-head results: block {layer} has no attention heads (its token mixer is "
                              f"{'a state-space or linear-attention layer' if mixer else 'absent: an MLP-only block'}"
                              f"); decompose_resid splits the residual stream by sublayer instead")
        z = self[("z", layer)]                              # [..., head, d_head]
        W_O = self.model.blocks[layer].attn.W_O             # [head, d_head, d_model]
        return torch.einsum("...hd,hdm->...hm", z, W_O.to(z.dtype))

    def compute_head_results(self) -> None:
        """Add every layer's `attn.hook_result` [batch, pos, head, d_model] to the cache
        (from hook_z and W_O: attn_out = sum over heads + b_O), as TransformerLens does
        when the model ran without `use_attn_result`."""
        for l in range(self._cfg.n_layers):
            self.cache_dict[f"blocks.{l}.attn.hook_result"] = self._head_result(l)
        self.cache_dict = {k: self.cache_dict[k] for k in canonical_order(self.cache_dict)}

    def stack_head_results(self, layer: int = -1, return_labels: bool = False, incl_remainder: bool = False,
                           pos_slice=None, apply_ln: bool = False):
        """Every head's result in the layers before `layer` (-1 / None: all of
        them), as [layer*head, *batch_and_pos, d_model] with labels "L0H0", "L0H1", ...

        Results come from the cache's `attn.hook_result` when it holds them, and
        are otherwise computed from `attn.hook_z` and W_O (TransformerLens's
        `compute_head_results`, without storing them). They exclude b_O, so each
        layer's heads sum to hook_attn_out - b_O. `incl_remainder` appends
        resid_post[layer-1] minus their sum ("remainder").
        """
        layer = self._layer(layer)
        heads = [apply_slice(self._head_result(l), pos_slice, -3) for l in range(layer)]
        labels = [f"L{l}H{h}" for l in range(layer) for h in range(self._cfg.n_heads)]
        if heads:
            stack = torch.cat(heads, dim=-2).movedim(-2, 0)    # [..., L*head, d_model] -> [L*head, ..., d_model]
        else:
            stack = self._empty_stack(pos_slice)
        if incl_remainder:
            # with no layers there are no heads: the remainder is the embedding, resid_pre 0
            total = self[("resid_post", layer - 1)] if layer > 0 else self[("resid_pre", 0)]
            rest = apply_slice(total, pos_slice, -2) - stack.sum(0)
            stack = torch.cat([stack, rest[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    def stack_activation(self, activation_name: str, layer: int = -1, sublayer_type: str | None = None):
        """`activation_name` (a short name: "pattern", "resid_pre", "scale" with
        sublayer_type "ln1", ...) of every layer before `layer`, stacked on a new dim 0."""
        layer = self._layer(layer)
        return torch.stack([self[(activation_name, l, sublayer_type)] for l in range(layer)])

    # --- per-neuron results -----------------------------------------------------------
    def get_neuron_results(self, layer: int, neuron_slice=None, pos_slice=None,
                           project_output_onto: torch.Tensor | None = None) -> torch.Tensor:
        """What each neuron of layer `layer` writes to the residual stream,
        mlp.hook_post * W_out: [*batch_and_pos, neuron, d_model] (summed over
        neurons, plus b_out, it is hook_mlp_out). `project_output_onto` ([d_model]
        or [d_model, n]) is folded into W_out first, so the last dim becomes
        () or n without building the d_model-wide tensor."""
        acts = apply_slice(self[("post", layer)], pos_slice, -2)     # [..., d_mlp]
        W_out = self.model.blocks[layer].mlp.W_out.to(acts.dtype)     # [d_mlp, d_model]
        if neuron_slice is not None:
            acts, W_out = apply_slice(acts, neuron_slice, -1), apply_slice(W_out, neuron_slice, 0)
        if project_output_onto is None:
            return acts[..., None] * W_out
        proj = W_out @ project_output_onto.to(W_out)                    # [d_mlp] or [d_mlp, n]
        return acts * proj if proj.ndim == 1 else acts[..., None] * proj

    def stack_neuron_results(self, layer: int, pos_slice=None, neuron_slice=None, return_labels: bool = False,
                             incl_remainder: bool = False, apply_ln: bool = False):
        """Every neuron's result in the layers before `layer`, as
        [layer*neuron, *batch_and_pos, d_model] with labels "L0N0", ... (b_out is
        not in them; `incl_remainder` appends the rest of resid_post[layer-1]).
        This is d_mlp times the size of the residual stream per layer."""
        layer = self._layer(layer)
        if isinstance(self._cfg.d_mlp, PerLayer):
            raise NotApplicableError(
                f"stack_neuron_results: the blocks' MLPs differ in width (cfg.d_mlp = {self._cfg.d_mlp!r}), "
                f"so their neurons make no one [layer*neuron] stack; use get_neuron_results(layer) for "
                f"each layer (its width is cfg.layers[layer].d_mlp)")
        idx = apply_slice(torch.arange(self._cfg.d_mlp), neuron_slice, 0).reshape(-1).tolist()
        labels = [f"L{l}N{i}" for l in range(layer) for i in idx]
        parts = [self.get_neuron_results(l, neuron_slice, pos_slice) for l in range(layer)]
        if neuron_slice is not None and isinstance(neuron_slice, int):
            parts = [p[..., None, :] for p in parts]              # keep a neuron dim of 1
        stack = torch.cat(parts, dim=-2).movedim(-2, 0) if parts else self._empty_stack(pos_slice)
        if incl_remainder:
            total = self[("resid_post", layer - 1)] if layer > 0 else self[("resid_pre", 0)]
            stack = torch.cat([stack, (apply_slice(total, pos_slice, -2) - stack.sum(0))[None]])
            labels.append("remainder")
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, pos_slice=pos_slice, has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack

    # --- norms and logits -------------------------------------------------------------
    def apply_ln_to_stack(self, residual_stack: torch.Tensor, layer: int | None = None, mlp_input: bool = False,
                          pos_slice=None, batch_slice=None, has_batch_dim: bool = True,
                          recompute_ln: bool = False) -> torch.Tensor:
        """Treat each component of `residual_stack` [component, *batch_and_pos,
        d_model] as input to layer `layer`'s ln1 (ln2 with `mlp_input`; the final
        norm for None / -1 / n_layers) and scale it as that norm scaled the real
        residual stream: centre it (LayerNorm models) and divide by the cached
        `hook_scale`. That map is linear, so the scaled components still sum to
        the scaled total: applied to the whole residual it gives `hook_normalized`.
        The norm's weight and bias are not applied (fold them in: `from_pretrained`).

        `pos_slice` / `batch_slice` say which positions / batch rows of the cached
        scale the stack covers (the pos slice is assumed already applied to the
        stack; the batch slice is applied to it here, on dim 1, when
        `has_batch_dim`). `recompute_ln` (unembed only): normalise each component
        with its own statistics and apply the final norm's weights (logit lens).
        Models without LayerNorm / RMSNorm get the stack back unchanged.
        """
        cfg = self._cfg
        if cfg.normalization_type not in _NORMS:
            return residual_stack
        layer = self._layer(layer)
        if has_batch_dim and batch_slice is not None:
            residual_stack = apply_slice(residual_stack, batch_slice, 1)
        if recompute_ln and layer == cfg.n_layers:
            return self.model.ln_final(residual_stack)
        if cfg.normalization_type.startswith("LN"):
            residual_stack = residual_stack - residual_stack.mean(-1, keepdim=True)
        if layer == cfg.n_layers:
            if mlp_input:
                raise ValueError("apply_ln_to_stack: mlp_input=True needs a layer below n_layers")
            name = "ln_final.hook_scale"
        else:
            name = f"blocks.{layer}.ln{2 if mlp_input else 1}.hook_scale"
        if name not in self.cache_dict:
            raise FxlensError(f"apply_ln_to_stack needs {name} in the cache; run_with_cache "
                              f"without a names_filter, or include it")
        scale = apply_slice(self.cache_dict[name], pos_slice, -2)    # [*batch_and_pos, 1]
        if self.has_batch_dim and batch_slice is not None:
            scale = apply_slice(scale, batch_slice, 0)
        return residual_stack / scale

    def logit_attrs(self, residual_stack: torch.Tensor, tokens, incorrect_tokens=None, pos_slice=None,
                    batch_slice=None, has_batch_dim: bool = True) -> torch.Tensor:
        """Direct logit attribution: each component's contribution to the logit
        of `tokens` (or to logit(tokens) - logit(incorrect_tokens)), i.e. the
        component scaled by the final norm's cached scale (`apply_ln_to_stack`)
        dotted with the token's unembedding direction (W_U column).
        [component, *batch_and_pos]. Summed over a full decomposition it gives the
        logit minus b_U when the final norm's weights are folded (`from_pretrained`).

        `tokens`: a string (one token), an int, or a tensor broadcasting against
        the stack's batch/pos dims ([batch] or [batch, pos]).
        """
        directions = self.model.tokens_to_residual_directions(tokens)
        if incorrect_tokens is not None:
            if _token_shape(tokens) != _token_shape(incorrect_tokens):
                raise ValueError(f"tokens and incorrect_tokens must have the same shape; got "
                                 f"{_token_shape(tokens)} and {_token_shape(incorrect_tokens)}")
            directions = directions - self.model.tokens_to_residual_directions(incorrect_tokens)
        scaled = self.apply_ln_to_stack(residual_stack, None, pos_slice=pos_slice, batch_slice=batch_slice,
                                        has_batch_dim=has_batch_dim)
        return (scaled * directions.to(scaled)).sum(-1)

    def get_full_resid_decomposition(self, layer: int | None = None, mlp_input: bool = False,
                                     expand_neurons: bool = True, apply_ln: bool = False, pos_slice=None,
                                     return_labels: bool = False):
        """The residual stream entering `layer` (its MLP with `mlp_input`; the
        unembed for None / -1 / n_layers) split as finely as it goes: every head's
        result ("L0H0", ...), every neuron's ("L0N0", ...; or each layer's
        mlp_out, "0_mlp_out", with `expand_neurons=False`), "embed", "pos_embed"
        (learned positions), and "bias": the summed b_O (and b_out when neurons are
        expanded). The components sum to the residual stream.
        [component, *batch_and_pos, d_model].
        """
        layer = self._layer(layer)
        if mlp_input and layer == self._cfg.n_layers:
            raise ValueError("get_full_resid_decomposition: mlp_input=True needs a layer below n_layers")
        # the MLP of a sequential block also reads this layer's attention output
        own_attn = mlp_input and not self._parallel
        heads, labels = self.stack_head_results(layer + own_attn, pos_slice=pos_slice, return_labels=True)
        parts = [heads]
        if self._has_mlp and layer > 0:
            if expand_neurons:
                mlp, mlp_labels = self.stack_neuron_results(layer, pos_slice=pos_slice, return_labels=True)
            else:
                mlp, mlp_labels = self.decompose_resid(layer, pos_slice=pos_slice, mode="mlp",
                                                       incl_embeds=False, return_labels=True)
            parts.append(mlp)
            labels += mlp_labels
        for name, label in (("hook_embed", "embed"), ("hook_pos_embed", "pos_embed")):
            if name in self.cache_dict:
                parts.append(apply_slice(self[name], pos_slice, -2)[None])
                labels.append(label)
        bias = self.model.accumulated_bias(layer, own_attn, include_mlp_biases=expand_neurons)
        parts.append(bias.to(heads).expand(1, *heads.shape[1:]))
        labels.append("bias")
        stack = torch.cat(parts)
        if apply_ln:
            stack = self.apply_ln_to_stack(stack, layer, mlp_input=mlp_input, pos_slice=pos_slice,
                                           has_batch_dim=self.has_batch_dim)
        return (stack, labels) if return_labels else stack
