"""Canonical TransformerLens hook names, built in one place.

A site is named by a *short* name relative to its block ("attn.hook_q") or a
global one ("hook_embed"). The lists below are in TransformerLens's execution
order, which is also the order of keys in an ActivationCache.
"""

from __future__ import annotations

import fnmatch
import re

from fxlens.errors import UnknownHookError

EMBED_SITES = ("embed.ln.hook_scale", "embed.ln.hook_normalized", "hook_embed", "hook_pos_embed")

BLOCK_SITES = (
    "hook_resid_pre",
    "hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
    "ln1.hook_scale", "ln1.hook_normalized",
    "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.q_norm.hook_scale", "attn.q_norm.hook_normalized", "attn.k_norm.hook_scale", "attn.k_norm.hook_normalized",
    "attn.v_norm.hook_scale", "attn.v_norm.hook_normalized",
    "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
    "ln1_post.hook_scale", "ln1_post.hook_normalized",
    "hook_attn_out",
    "hook_mixer_out",   # not TransformerLens's: a state-space / linear-attention mixer's output
    "hook_resid_mid", "hook_mlp_in",
    "ln2.hook_scale", "ln2.hook_normalized",
    "mlp.hook_expert_weights", "mlp.hook_expert_indices",   # then mlp.experts.E.* (EXPERT_SITES)
    "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post",
    "ln2_post.hook_scale", "ln2_post.hook_normalized",
    "hook_mlp_out",
    # not TransformerLens's: a branch after the MLP and a gain ending the block (Gemma 4),
    # resid_post = gain * (resid_mid2 + extra_out), resid_mid2 = resid_mid + mlp_out
    "hook_resid_mid2", "hook_extra_out", "hook_resid_unscaled",
    "hook_resid_post",
)

# each routed expert's sites, mlp.experts.E.<site>, in the order TransformerLens runs them
EXPERT_SITES = ("hook_gate", "hook_pre", "hook_post")

FINAL_SITES = ("ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out")

# TransformerLens's HookedEncoder (BERT): post-LN blocks, so ln1 normalises
# resid_mid (the MLP reads it), ln2 normalises resid_post, and the next block
# reads hook_normalized_resid_post; the embeddings are summed and normalised.
ENCODER_EMBED_SITES = ("embed.hook_embed", "embed.hook_pos_embed", "embed.hook_token_type_embed",
                       "embed.ln.hook_scale", "embed.ln.hook_normalized", "hook_full_embed")

ENCODER_BLOCK_SITES = (
    "hook_resid_pre", "hook_q_input", "hook_k_input", "hook_v_input",
    "attn.hook_q", "attn.hook_k", "attn.hook_v",
    "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "attn.hook_result",
    "hook_attn_out", "hook_resid_mid", "hook_mlp_in", "ln1.hook_scale", "ln1.hook_normalized",
    "mlp.hook_pre", "mlp.hook_post", "hook_mlp_out", "hook_resid_post",
    "ln2.hook_scale", "ln2.hook_normalized", "hook_normalized_resid_post",
)

ENCODER_FINAL_SITES = ("mlm_head.ln.hook_scale", "mlm_head.ln.hook_normalized", "unembed.hook_in",
                       "unembed.hook_out")

# names only an encoder has: a set of names holding one is ordered as an encoder's
_ENCODER_ONLY = ((set(ENCODER_EMBED_SITES) | set(ENCODER_FINAL_SITES[:2])
                  | {"hook_normalized_resid_post"}) - set(EMBED_SITES))   # a decoder may have embed.ln (BLOOM)

# Sites TransformerLens only has when a config flag is set; fxlens materialises
# them the first time a user asks for one by name.
OPT_IN_SITES = ("hook_attn_in", "hook_q_input", "hook_k_input", "hook_v_input",
                "attn.hook_result", "hook_mlp_in")


def block_name(layer: int, short: str) -> str:
    return f"blocks.{layer}.{short}"


def split_name(name: str) -> tuple[int | None, str]:
    """'blocks.3.attn.hook_q' -> (3, 'attn.hook_q'); 'hook_embed' -> (None, 'hook_embed')."""
    if name.startswith("blocks."):
        _, layer, short = name.split(".", 2)
        return int(layer), short
    return None, name


def is_opt_in(name: str) -> bool:
    return split_name(name)[1] in OPT_IN_SITES


# The hook points of an SAE spliced at a site (SAELens's names, after `<site>.`),
# in the order they run.
SAE_SITES = ("hook_sae_input", "hook_sae_acts_pre", "hook_sae_acts_post", "hook_sae_recons",
             "hook_sae_error", "hook_sae_output")


def canonical_order(names) -> list[str]:
    """Sort hook names into TransformerLens execution order (HookedEncoder's
    order when the names include an encoder-only one); an SAE's sites
    (`<site>.hook_sae_*`) come right after their site, in SAE_SITES order."""
    names = list(names)
    rank_sae = {s: i for i, s in enumerate(SAE_SITES)}
    encoder = any(split_name(n)[1] in _ENCODER_ONLY for n in names)
    embed, block, final = ((ENCODER_EMBED_SITES, ENCODER_BLOCK_SITES, ENCODER_FINAL_SITES) if encoder
                           else (EMBED_SITES, BLOCK_SITES, FINAL_SITES))
    rank_block = {s: i for i, s in enumerate(block)}
    rank_embed = {s: i for i, s in enumerate(embed)}
    rank_final = {s: i for i, s in enumerate(final)}

    def key(name):
        site, _, sub = name.rpartition(".")
        if site and sub.startswith("hook_sae_"):
            return (*site_key(site), rank_sae.get(sub, len(rank_sae)), sub)
        return (*site_key(name), -1, "")

    def site_key(name):
        layer, short = split_name(name)
        expert = re.fullmatch(r"mlp\.experts\.(\d+)\.(hook_\w+)", short)
        if layer is not None and expert:
            # after the router's sites, by expert, each in EXPERT_SITES order
            e, sub = int(expert.group(1)), expert.group(2)
            sub_rank = EXPERT_SITES.index(sub) if sub in EXPERT_SITES else len(EXPERT_SITES)
            return (1, layer, rank_block["mlp.hook_expert_indices"] + 0.5, f"{e:08d}.{sub_rank}.{sub}")
        if layer is not None:
            return (1, layer, rank_block.get(short, len(rank_block)), short)
        if short in rank_embed:
            return (0, 0, rank_embed[short], short)
        return (2, 0, rank_final.get(short, len(rank_final)), short)

    return sorted(names, key=key)


# TransformerLens's aliases for `cache["pattern", 0]`-style keys.
_ACT_ALIASES = {"attn": "pattern", "attn_logits": "attn_scores", "key": "k", "query": "q",
                "value": "v", "mlp_pre": "pre", "mlp_mid": "mid", "mlp_post": "post"}
_ATTN_ACTS = {"k", "v", "q", "z", "rot_k", "rot_q", "result", "pattern", "attn_scores"}
_MLP_ACTS = {"pre", "post", "mid", "pre_linear"}
_LAYER_TYPE_ALIASES = {"a": "attn", "m": "mlp", "b": "", "block": "", "blocks": "", "attention": "attn"}


def act_name(name: str, layer: int | None = None, layer_type: str | None = None) -> str:
    """Full hook name from TransformerLens's short form: ('resid_post', 3) ->
    'blocks.3.hook_resid_post', ('scale', 2, 'ln1') -> 'blocks.2.ln1.hook_scale'."""
    if ("." in name or name.startswith("hook_")) and layer is None and layer_type is None:
        return name
    name = _ACT_ALIASES.get(name, name)
    full = f"blocks.{layer}." if layer is not None else ""
    if name in _ATTN_ACTS:
        layer_type = "attn"
    elif name in _MLP_ACTS:
        layer_type = "mlp"
    elif layer_type in _LAYER_TYPE_ALIASES:
        layer_type = _LAYER_TYPE_ALIASES[layer_type]
    if layer_type:
        full += f"{layer_type}."
    full += f"hook_{name}"
    if name in ("scale", "normalized") and layer is None:
        full = f"ln_final.{full}"
    return full


def resolve_names(hook_names: list[str], names: list[str] | None) -> list[str] | None:
    """Hook names from the command line: exact names (opt-in sites included),
    globs like 'blocks.*.attn.hook_pattern', comma-separated lists. None = all."""
    if not names:
        return None
    out: list[str] = []
    for item in (n.strip() for arg in names for n in arg.split(",")):
        if not item:
            continue
        if any(c in item for c in "*?["):
            hits = fnmatch.filter(hook_names, item)
            if not hits:
                raise UnknownHookError(item, hook_names)
            out += hits
        else:
            out.append(item)
    return list(dict.fromkeys(out))
