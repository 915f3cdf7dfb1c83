"""Tiny random-weight HuggingFace causal LMs, built from configs in code.

No downloads: every model is `AutoModelForCausalLM.from_config(...)` with eager
attention, float32, `.eval()`. Sizes are tiny (vocab 256, d_model 64, 2 layers,
4 heads of 16, d_mlp 128, n_ctx 128) so a test file can build a dozen of them
on a 2-core CPU in seconds.

Weights are redrawn with std 0.25 (matrices), norm weights 1 + 0.1*N(0,1)
(Gemma-style `(1 + w)` norms: w = 0.1*N(0,1)) and biases 0.1*N(0,1), so
attention is peaked and every norm-weight / bias mistake moves the numbers.

`ARCHS` maps each name to a short description of what it exercises;
`FEATURES[name]` records the structural facts the tests expect.
"""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

VOCAB = 256
D_MODEL = 64
N_LAYERS = 2
N_HEADS = 4
N_KV = 2          # GQA where the architecture allows it
D_HEAD = D_MODEL // N_HEADS
D_MLP = 128
N_CTX = 128

# token ids used by configs; all inside the vocabulary
_SPECIAL = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)

_LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=D_MLP,
                   num_hidden_layers=N_LAYERS, num_attention_heads=N_HEADS,
                   num_key_value_heads=N_KV, max_position_embeddings=N_CTX, **_SPECIAL)


def _rope(**kw):
    return {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, **kw}}


# name -> (model_type, config kwargs)
CONFIGS: dict[str, tuple[str, dict]] = {
    "gpt2": ("gpt2", dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                          n_inner=D_MLP, n_positions=N_CTX, resid_pdrop=0.0, embd_pdrop=0.0,
                          attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)),
    "llama": ("llama", dict(_LLAMA_LIKE)),
    # sliding window wider than the test sequence (the window is a mask detail)
    "mistral": ("mistral", dict(_LLAMA_LIKE, sliding_window=N_CTX)),
    "qwen2": ("qwen2", dict(_LLAMA_LIKE)),                    # q/k/v biases
    "qwen3": ("qwen3", dict(_LLAMA_LIKE, head_dim=D_HEAD)),  # per-head q/k RMSNorm
    "gemma": ("gemma", dict(_LLAMA_LIKE, head_dim=D_HEAD, hidden_activation="gelu_pytorch_tanh")),
    "gemma2": ("gemma2", dict(_LLAMA_LIKE, head_dim=D_HEAD, hidden_activation="gelu_pytorch_tanh",
                              query_pre_attn_scalar=D_HEAD, attn_logit_softcapping=50.0,
                              final_logit_softcapping=30.0, sliding_window=N_CTX,
                              layer_types=["sliding_attention", "full_attention"])),
    # a sliding window shorter than the test sequence (7): the mask must flow through
    "gemma2_sw": ("gemma2", dict(_LLAMA_LIKE, head_dim=D_HEAD, hidden_activation="gelu_pytorch_tanh",
                                 query_pre_attn_scalar=D_HEAD, attn_logit_softcapping=50.0,
                                 final_logit_softcapping=30.0, sliding_window=4,
                                 layer_types=["sliding_attention", "full_attention"])),
    # parallel attn+MLP on one shared LayerNorm, partial rotary, biased linears
    "phi": ("phi", dict(_LLAMA_LIKE, hidden_act="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0,
                        **_rope(partial_rotary_factor=0.5))),
    # fused qkv_proj and gate_up_proj
    "phi3": ("phi3", dict(_LLAMA_LIKE, resid_pdrop=0.0, embd_pdrop=0.0, original_max_position_embeddings=N_CTX)),
    # falcon-7b style: multi-query, parallel attn+MLP on one LayerNorm, FalconLinear
    "falcon": ("falcon", dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                              num_attention_heads=N_HEADS, ffn_hidden_size=D_MLP,
                              max_position_embeddings=N_CTX, new_decoder_architecture=False,
                              multi_query=True, parallel_attn=True, alibi=False, bias=False,
                              **_SPECIAL)),
    # falcon-40b style: new decoder architecture, GQA, two LayerNorms (ln_attn / ln_mlp)
    "falcon_new": ("falcon", dict(vocab_size=VOCAB, hidden_size=D_MODEL, num_hidden_layers=N_LAYERS,
                                  num_attention_heads=N_HEADS, num_kv_heads=N_KV, ffn_hidden_size=D_MLP,
                                  max_position_embeddings=N_CTX, new_decoder_architecture=True,
                                  num_ln_in_parallel_attn=2, parallel_attn=True, alibi=False,
                                  bias=True, **_SPECIAL)),
    # multi-query attention in one fused c_attn (Conv-free nn.Linear), learned positions
    "gpt_bigcode": ("gpt_bigcode", dict(vocab_size=VOCAB, n_embd=D_MODEL, n_layer=N_LAYERS, n_head=N_HEADS,
                                        n_inner=D_MLP, n_positions=N_CTX, multi_query=True,
                                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                        bos_token_id=1, eos_token_id=2)),
    # LayerNorm + partial rotary (25%) + q/k/v biases, sequential block
    "stablelm": ("stablelm", dict(_LLAMA_LIKE, use_qkv_bias=True, **_rope(partial_rotary_factor=0.25))),
    # LayerNorm with bias, non-gated MLP with bias, GQA
    "starcoder2": ("starcoder2", dict(_LLAMA_LIKE, use_bias=True, residual_dropout=0.0,
                                      embedding_dropout=0.0, sliding_window=None)),
    # post-norms only, q/k RMSNorm over the flat [b, s, h*d] projection
    "olmo2": ("olmo2", dict(_LLAMA_LIKE)),
    # sparse MoE MLP: 4 experts, top-2
    "mixtral": ("mixtral", dict(_LLAMA_LIKE, num_local_experts=4, num_experts_per_tok=2)),
}

ARCHS = list(CONFIGS)

# Built on demand (by name, as CONFIGS), not part of ARCHS (the per-architecture sweeps).
MORE_CONFIGS: dict[str, tuple[str, dict]] = {
    # Gemma 3: local (sliding) and global layers with their own rotary bases, q/k RMSNorm
    "gemma3": ("gemma3_text", dict(_LLAMA_LIKE, head_dim=D_HEAD, hidden_activation="gelu_pytorch_tanh",
                                   query_pre_attn_scalar=D_HEAD, sliding_window=N_CTX,
                                   layer_types=["sliding_attention", "full_attention"],
                                   rope_parameters={"sliding_attention": _rope()["rope_parameters"],
                                                    "full_attention": _rope(rope_theta=1e6)["rope_parameters"]})),
    # blocks that differ: block 0 routes 4 experts (width 32), block 1 is a dense MLP (D_MLP)
    "qwen3_moe_mixed": ("qwen3_moe", dict(_LLAMA_LIKE, head_dim=D_HEAD, num_experts=4, num_experts_per_tok=2,
                                          moe_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[1])),
}

# Archs whose RMSNorm multiplies by (1 + w) (weights initialised at zero).
_ONE_PLUS_W = {"gemma", "gemma2", "gemma2_sw", "gemma3"}


def tiny_config(arch: str, **overrides):
    model_type, kw = CONFIGS[arch] if arch in CONFIGS else MORE_CONFIGS[arch]
    cfg = AutoConfig.for_model(model_type, **{**kw, **overrides})
    cfg.tie_word_embeddings = False if arch not in ("gpt2", "gpt_bigcode") else cfg.tie_word_embeddings
    return cfg


@torch.no_grad()
def _perturb(model: torch.nn.Module, one_plus_w: bool, gen: torch.Generator) -> None:
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.25)
        elif name.endswith("bias"):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        elif one_plus_w and "norm" in name:
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
        else:  # norm weights (LayerNorm / RMSNorm gains)
            p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.1)


def tiny_model(arch: str, seed: int = 0, **overrides) -> PreTrainedModel:
    """A tiny random-weight causal LM of architecture `arch` (see `ARCHS`, `MORE_CONFIGS`),
    its config fields changed by `overrides` (e.g. `sliding_window=8`)."""
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _perturb(model, arch in _ONE_PLUS_W, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()
