"""TransformerLens's model-side analysis helpers on HookedModel: loss, token
directions, accumulated biases, and the final norm as a function (what
`ActivationCache`'s analysis methods call back into)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fxlens.errors import FxlensError


def lm_cross_entropy_loss(logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                          per_token: bool = False) -> torch.Tensor:
    """Next-token cross-entropy (position i predicts token i+1): [batch, pos-1] per
    token, else the mean. With `attention_mask` [batch, pos], a prediction counts
    only where both its position and the next are unmasked (masked ones are 0)."""
    log_probs = F.log_softmax(logits[..., :-1, :].float(), dim=-1)
    nll = -log_probs.gather(-1, tokens[..., 1:, None].to(logits.device))[..., 0]
    if attention_mask is None:
        return nll if per_token else nll.mean()
    if attention_mask.shape != tokens.shape:
        raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; it must match "
                         f"tokens, {tuple(tokens.shape)}")
    mask = attention_mask.to(nll.device).bool()
    keep = mask[..., :-1] & mask[..., 1:]
    nll = nll.masked_fill(~keep, 0.0)
    return nll if per_token else nll.sum() / keep.sum()


class AnalysisMixin:
    """Needs `cfg`, `W_U`, `blocks` (weight views) and the hook machinery of HookedModel."""

    def loss_fn(self, logits: torch.Tensor, tokens: torch.Tensor, attention_mask: torch.Tensor | None = None,
                per_token: bool = False) -> torch.Tensor:
        """TransformerLens's `lm_cross_entropy_loss` of `logits` for `tokens`."""
        return lm_cross_entropy_loss(logits, tokens, attention_mask, per_token)

    def tokens_to_residual_directions(self, tokens) -> torch.Tensor:
        """The unembedding direction (W_U column) of each token: [d_model] for a
        single token (a string that is one token, an int, a one-element tensor),
        else [*tokens.shape, d_model]. Fold the final norm first
        (`from_pretrained`), or its weights are missing from these directions."""
        if isinstance(tokens, torch.Tensor) and tokens.numel() > 1:
            return self.W_U[:, tokens.to(self.W_U.device)].movedim(0, -1)
        if isinstance(tokens, str):
            token = self.to_single_token(tokens)
        elif isinstance(tokens, torch.Tensor):
            token = int(tokens.reshape(-1)[0]) if tokens.numel() == 1 else None
        else:
            token = int(tokens)
        if token is None:
            raise ValueError("tokens_to_residual_directions: got an empty tensor")
        return self.W_U[:, token]

    def accumulated_bias(self, layer: int, mlp_input: bool = False, include_mlp_biases: bool = True) -> torch.Tensor:
        """[d_model]: the b_O (and b_out) of every layer before `layer`, plus this
        layer's b_O with `mlp_input` (the MLP of a sequential block reads it)."""
        blocks = self.blocks
        total = torch.zeros(self.cfg.d_model, dtype=self.W_U.dtype, device=self.W_U.device)
        for b in blocks[:layer]:
            total = total + b.attn.b_O
            if include_mlp_biases and self.cfg.d_mlp is not None:
                total = total + b.mlp.b_out
        if mlp_input:
            if layer >= self.cfg.n_layers:
                raise ValueError(f"accumulated_bias: mlp_input=True needs layer < n_layers={self.cfg.n_layers}")
            total = total + blocks[layer].attn.b_O
        return total

    def ln_final(self, x: torch.Tensor) -> torch.Tensor:
        """The final norm applied to `x` [..., d_model] with x's own statistics
        (centre and divide by sqrt(var + eps) for LayerNorm, divide by
        sqrt(mean(x^2) + eps) for RMSNorm), then the norm's weight and bias, so
        `ln_final(x) @ W_U + b_U` are logits. Models without a final norm return x."""
        kind = self.cfg.normalization_type
        if kind not in ("LN", "LNPre", "RMS", "RMSPre") or "ln_final.hook_normalized" not in self.hook_dict:
            return x
        eps = self.cfg.eps if self.cfg.eps is not None else 1e-5
        if kind.startswith("LN"):
            x = x - x.mean(-1, keepdim=True)
        normalized = x / (x.pow(2).mean(-1, keepdim=True) + eps).sqrt()
        weight, bias = self._ln_final_affine()
        return normalized * weight.to(normalized) + bias.to(normalized)

    def _ln_final_affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, b) [d_model] with unembed input = w * ln_final.hook_normalized + b.

        Read by running the eager graph on one token with the normalized value
        replaced by 0 and then by 1, so any per-feature affine tail (weight and
        bias, Gemma's 1 + w, casts; nothing once folded) is found without
        knowing how the model writes it. Cached per weight version."""
        cached = getattr(self, "_ln_final_affine_cache", None)
        if cached is not None and cached[0] == self._graph_version:
            return cached[1]
        if "unembed.hook_in" not in self.hook_dict:
            raise FxlensError("ln_final: this model has no unembed.hook_in site to read the final "
                              "norm's weights from; use apply_ln_to_stack(recompute_ln=False)")
        seen: dict[float, torch.Tensor] = {}
        tokens = torch.zeros(1, 1, dtype=torch.long, device=self.cfg.device)
        for value in (0.0, 1.0):
            def fill(x, hook, value=value):
                return torch.full_like(x, value)

            def grab(x, hook, value=value):
                seen[value] = x.detach().reshape(-1, x.shape[-1])[0]

            with torch.no_grad(), self.hooks(fwd_hooks=[("ln_final.hook_normalized", fill),
                                                        ("unembed.hook_in", grab)]):
                self._graph_for(tokens)(tokens)
        affine = (seen[1.0] - seen[0.0], seen[0.0])
        self._ln_final_affine_cache = (self._graph_version, affine)
        return affine
