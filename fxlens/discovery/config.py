"""`model.cfg`: the model's shape under TransformerLens's field names, derived
from the analysed graph first and the HF config second."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch


@dataclass
class FxlensConfig:
    n_layers: int
    d_model: int
    n_ctx: int
    d_head: int
    n_heads: int
    d_vocab: int
    d_mlp: int | None
    n_key_value_heads: int | None = None
    act_fn: str | None = None
    normalization_type: str | None = None      # "LN" | "RMS" | "LNPre" | "RMSPre" | None
    positional_embedding_type: str = "standard"  # "standard" | "rotary" | "none"
    rotary_dim: int | None = None
    parallel_attn_mlp: bool = False
    gated_mlp: bool = False
    use_normalization_before_and_after: bool = False
    eps: float | None = None
    original_architecture: str | None = None
    model_name: str = ""
    attention_dir: str = "causal"
    default_prepend_bos: bool = True
    tokenizer_prepends_bos: bool | None = None
    d_vocab_out: int | None = None
    dtype: torch.dtype = torch.float32
    device: str = "cpu"
    final_rms: bool = False
    use_attn_result: bool = False
    use_split_qkv_input: bool = False
    use_hook_mlp_in: bool = False
    use_attn_in: bool = False
    num_experts: int | None = None
    experts_per_token: int | None = None
    use_qk_norm: bool = False
    rotary_base: float = 10000.0
    attn_scores_soft_cap: float = -1.0        # TransformerLens: -1 = no soft cap
    output_logits_soft_cap: float = -1.0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _first(config, *keys):
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return None


def make_config(spec, hf_config, n_ctx: int, name: str, dtype, device, arch: str | None = None) -> FxlensConfig:
    b0 = spec.blocks[0]
    kinds = {spec.norm_kinds[p] for p in spec.norm_kinds}
    norm = next(iter(kinds)) if len(kinds) == 1 else (sorted(kinds)[0] if kinds else None)
    rotary_dim = None
    if b0.rotary:
        rope = getattr(hf_config, "rope_parameters", None) or {}
        factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
        factor = factor or _first(hf_config, "partial_rotary_factor", "rotary_pct")
        rotary_dim = _first(hf_config, "rotary_dim") or (int(b0.d_head * factor) if factor else b0.d_head)
    eps = _first(hf_config, "layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "norm_eps")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:     # per layer type (Gemma 3): the global one
        rope = rope["full_attention"] or {}
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or _first(hf_config, "rope_theta")
    archs = getattr(hf_config, "architectures", None)
    return FxlensConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, n_ctx=n_ctx, d_head=b0.d_head,
        n_heads=b0.n_heads, d_vocab=spec.d_vocab, d_vocab_out=spec.d_vocab, d_mlp=b0.d_mlp,
        n_key_value_heads=b0.n_kv_heads if b0.n_kv_heads != b0.n_heads else None,
        act_fn=_first(hf_config, "hidden_act", "activation_function", "hidden_activation"),
        normalization_type=norm,
        positional_embedding_type="rotary" if b0.rotary else ("standard" if spec.pos_embed is not None else "none"),
        rotary_dim=rotary_dim, parallel_attn_mlp=b0.parallel, gated_mlp=b0.gated,
        # norms on both sides of a sublayer (Gemma 2); post-norms alone (OLMo 2) are TL's ln1/ln2
        use_normalization_before_and_after=bool((b0.ln1 and b0.ln1_post) or (b0.ln2 and b0.ln2_post)),
        eps=eps, original_architecture=arch or (archs[0] if archs else type(hf_config).__name__),
        model_name=name, final_rms=spec.ln_final is not None and spec.norm_kinds.get(spec.ln_final) == "RMS",
        dtype=dtype, device=str(device), num_experts=_first(hf_config, "num_local_experts", "num_experts") if b0.moe else None,
        experts_per_token=_first(hf_config, "num_experts_per_tok") if b0.moe else None,
        use_qk_norm=any(".attn.q_norm." in n or ".attn.k_norm." in n for n in spec.sites),
        rotary_base=float(theta) if b0.rotary and theta else 10000.0,
        attn_scores_soft_cap=float(_first(hf_config, "attn_logit_softcapping") or -1.0),
        output_logits_soft_cap=float(_first(hf_config, "final_logit_softcapping") or -1.0),
    )
