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
    positional_embedding_type: str = "standard"  # "standard" | "rotary" | "alibi" | "none"
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
    use_local_attn: bool = False              # some layers attend within a sliding window
    attn_types: list | None = None            # per layer "global" | "local" (when use_local_attn)
    window_size: int | None = None            # the local layers' window
    layers: list = field(default_factory=list)   # LayerConfig per block: where a field above is PerLayer
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


def _first(config, *keys):
    for k in keys:
        v = getattr(config, k, None)
        if v is not None:
            return v
    return None


class PerLayer(tuple):
    """A cfg field whose value differs between blocks: one entry per layer
    (`cfg.d_mlp == PerLayer((None, 128))` for an MoE block then a dense one), where
    TransformerLens's config holds one number. `cfg.layers[L]` has block L's own."""

    def __repr__(self) -> str:
        return f"PerLayer({list(self)})"


def _across(values: list):
    """One value where every layer agrees, else the per-layer values."""
    return values[0] if all(v == values[0] for v in values) else PerLayer(values)


@dataclass
class LayerConfig:
    """Block L's own shape (`model.cfg.layers[L]`), under TransformerLens's names."""
    n_heads: int
    d_head: int
    n_key_value_heads: int | None
    d_mlp: int | None
    gated_mlp: bool
    parallel_attn_mlp: bool
    use_normalization_before_and_after: bool
    positional_embedding_type: str
    num_experts: int | None
    experts_per_token: int | None
    attn_type: str                  # "global" | "local" (sliding window); another kind by HF's name
    window_size: int | None
    # not TransformerLens's: "attn", "mixer" (a state-space or linear-attention layer:
    # hook_mixer_out, no attention sites, n_heads 0) or "none" (an MLP-only layer)
    token_mixer: str = "attn"
    has_mlp: bool = True

    @property
    def has_attn(self) -> bool:
        return self.token_mixer == "attn"

    def sublayer_outputs(self) -> tuple[str, ...]:
        """What the block adds to the residual stream, in order, by site:
        hook_attn_out (an attention) or hook_mixer_out (a token mixer without
        attention scores), then hook_mlp_out where it has an MLP."""
        mixer = {"attn": ("hook_attn_out",), "mixer": ("hook_mixer_out",)}.get(self.token_mixer, ())
        return (*mixer, *(("hook_mlp_out",) if self.has_mlp else ()))


def attention_types(hf_config, n_layers: int) -> tuple[list[str], int | None]:
    """Each layer's attention kind from the HF config, in TransformerLens's words
    ("global", "local"), and the local layers' window: `layer_types` (Gemma 2/3,
    Cohere 2, ...: sliding_attention / full_attention), GPT-Neo's `attention_layers`,
    or one `sliding_window` for every layer (Mistral) unless `use_sliding_window`
    is off (Qwen)."""
    words = {"sliding_attention": "local", "full_attention": "global"}
    kinds = getattr(hf_config, "layer_types", None) or getattr(hf_config, "attention_layers", None)
    window = _first(hf_config, "sliding_window", "window_size")
    if kinds is not None and len(kinds) == n_layers:
        kinds = [words.get(k, k) for k in kinds]
    elif isinstance(window, int) and getattr(hf_config, "use_sliding_window", None) is not False:
        kinds = ["local"] * n_layers
    else:
        kinds = ["global"] * n_layers
    return kinds, (window if "local" in kinds else None)


def _rotary_dim(hf_config, d_head: int) -> int:
    rope = getattr(hf_config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor") if isinstance(rope, dict) else None
    factor = factor or _first(hf_config, "partial_rotary_factor", "rotary_pct")
    # MLA rotates only its qk_rope_head_dim slice of each head
    return _first(hf_config, "rotary_dim", "qk_rope_head_dim") or (int(d_head * factor) if factor else d_head)


def make_config(spec, hf_config, n_ctx: int, name: str, dtype, device, arch: str | None = None) -> FxlensConfig:
    """cfg from every block: a field the blocks agree on is one value, as in
    TransformerLens; one they differ on (per-layer d_mlp, MoE blocks between dense
    ones, rotary and NoPE layers) is a `PerLayer` tuple; `cfg.layers[L]` is block L's."""
    kinds = {spec.norm_kinds[p] for p in spec.norm_kinds}
    norm = next(iter(kinds)) if len(kinds) == 1 else (sorted(kinds)[0] if kinds else None)
    attn_types, window = attention_types(hf_config, spec.n_layers)
    n_experts = _first(hf_config, "num_local_experts", "num_experts")
    positional = "standard" if spec.pos_embed is not None else "none"
    layers = [LayerConfig(
        n_heads=b.n_heads, d_head=b.d_head, n_key_value_heads=b.n_kv_heads if b.n_kv_heads != b.n_heads else None,
        d_mlp=b.d_mlp, gated_mlp=b.gated, parallel_attn_mlp=b.parallel,
        # norms on both sides of a sublayer (Gemma 2); post-norms alone (OLMo 2) are TL's ln1/ln2
        use_normalization_before_and_after=bool((b.ln1 and b.ln1_post) or (b.ln2 and b.ln2_post)),
        positional_embedding_type="rotary" if b.rotary else "alibi" if b.alibi else positional,
        num_experts=n_experts if b.moe else None,
        experts_per_token=_first(hf_config, "num_experts_per_tok") if b.moe else None,
        attn_type=kind, window_size=window if kind == "local" else None,
        token_mixer="attn" if b.has_attn else "mixer" if b.mixer else "none", has_mlp=b.has_mlp)
        for b, kind in zip(spec.blocks, attn_types)]

    def across(field_name):
        return _across([getattr(layer, field_name) for layer in layers])

    def across_attention(field_name):
        # a hybrid's heads: its attention layers' (mixer layers have none), 0 without any
        values = [getattr(layer, field_name) for layer in layers if layer.has_attn]
        return _across(values) if values else 0

    rotary = [b for b in spec.blocks if b.rotary]
    rotary_dim = _across([_rotary_dim(hf_config, b.d_head) for b in rotary]) if rotary else None
    eps = _first(hf_config, "layer_norm_eps", "rms_norm_eps", "layer_norm_epsilon", "norm_eps")
    rope = getattr(hf_config, "rope_parameters", None) or {}
    if isinstance(rope, dict) and "full_attention" in rope:     # per layer type (Gemma 3): the global one
        rope = rope["full_attention"] or {}
    theta = (rope.get("rope_theta") if isinstance(rope, dict) else None) or _first(hf_config, "rope_theta")
    archs = getattr(hf_config, "architectures", None)
    local = "local" in attn_types
    return FxlensConfig(
        n_layers=spec.n_layers, d_model=spec.d_model, n_ctx=n_ctx, d_head=across_attention("d_head"),
        n_heads=across_attention("n_heads"), d_vocab=spec.d_vocab, d_vocab_out=spec.d_vocab,
        d_mlp=across("d_mlp"), n_key_value_heads=across_attention("n_key_value_heads") or None,
        act_fn=_first(hf_config, "hidden_act", "activation_function", "hidden_activation"),
        normalization_type=norm, positional_embedding_type=across("positional_embedding_type"),
        rotary_dim=rotary_dim, parallel_attn_mlp=across("parallel_attn_mlp"), gated_mlp=across("gated_mlp"),
        use_normalization_before_and_after=across("use_normalization_before_and_after"),
        eps=eps, original_architecture=arch or (archs[0] if archs else type(hf_config).__name__),
        model_name=name, final_rms=spec.ln_final is not None and spec.norm_kinds.get(spec.ln_final) == "RMS",
        dtype=dtype, device=str(device), num_experts=across("num_experts"),
        experts_per_token=across("experts_per_token"),
        use_qk_norm=any(".attn.q_norm." in n or ".attn.k_norm." in n for n in spec.sites),
        rotary_base=float(theta) if rotary and theta else 10000.0,
        attn_scores_soft_cap=float(_first(hf_config, "attn_logit_softcapping") or -1.0),
        output_logits_soft_cap=float(_first(hf_config, "final_logit_softcapping") or -1.0),
        use_local_attn=local, attn_types=attn_types if local else None, window_size=window,
        layers=layers,
    )
