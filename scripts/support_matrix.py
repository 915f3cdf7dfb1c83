"""Support sweep: every causal-LM model type of transformers, built tiny, instrumented by fxlens.

For each `model_type` of `MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`:
  1. build it tiny from its own config class (`tiny_config`: small sizes found
     by config field name, eager attention, fixed seed; where HF's model cannot
     be built or run at those sizes, the wider WIDE ones) and run HF's forward
     with hidden states -- a type whose HF model cannot be built or run at
     either is listed as `hf-broken` and not counted;
  2. capture it (`fxlens.capture`: torch.export; a failure counts against fxlens),
     instrument it unprocessed and check: log-probs equal HF's, every layer has
     the core sites, `hook_resid_pre` equals HF's `hidden_states[L]`, pattern
     rows sum to 1;
  3. instrument it processed (`fxlens.from_pretrained`): log-probs equal HF's.

Each type runs in its own forked subprocess with a time limit (--jobs at once).
Writes docs/SUPPORT.md and docs/support.json.

    nice -n 10 .venv/bin/python scripts/support_matrix.py            # all types
    nice -n 10 .venv/bin/python scripts/support_matrix.py --only gpt2,bloom --no-write
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# float32 throughout; the largest difference must be at most RTOL of the
# reference's largest magnitude: rounding stays ~1e-6 relative, a wrong site or
# rewrite moves values by O(1).
RTOL = 1e-4
BATCH, SEQ = 2, 7
CORE_SITES = ("hook_resid_pre", "attn.hook_pattern", "hook_attn_out", "hook_mlp_out", "hook_resid_post")
# a hybrid's layers (fxlens's cfg.layers[L]): a token mixer without attention scores (a
# state-space or linear-attention layer: hook_mixer_out, its output) where the core
# sites have attention, and no MLP site in a block without one (Nemotron-H's attention,
# mixer and MLP layers are blocks of their own)
def layer_sites(layer_cfg) -> tuple:
    """The sites a layer must have, by the sublayers fxlens found in it (None: an
    attention and an MLP)."""
    if layer_cfg is None:
        return CORE_SITES
    pattern = ("attn.hook_pattern",) if layer_cfg.has_attn else ()
    return ("hook_resid_pre", *pattern, *layer_cfg.sublayer_outputs(), "hook_resid_post")


def layer_kind(layer_cfg) -> str:
    if layer_cfg is None:
        return "attn+mlp"
    if layer_cfg.token_mixer == "none":
        return "mlp" if layer_cfg.has_mlp else "skipped"
    return layer_cfg.token_mixer + ("+mlp" if layer_cfg.has_mlp else "")


# Tiny sizes, by the config field's (standard) name. A config class that spells a
# field differently declares it in its `attribute_map`, which `tiny_config` follows.
VOCAB = 512
N_LAYERS = 2
TINY = {
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "embed_dim": 64,
    "num_hidden_layers": N_LAYERS, "n_layer": N_LAYERS, "num_layers": N_LAYERS, "n_layers": N_LAYERS,
    "decoder_layers": N_LAYERS,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "decoder_attention_heads": 4,
    "head_dim": 16, "kv_channels": 16, "attention_head_dim": 16,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "ffn_hidden_size": 128, "d_ff": 128,
    "decoder_ffn_dim": 128, "mlp_dim": 128, "dim_ff": 128,
    "moe_intermediate_size": 32, "shared_expert_intermediate_size": 64, "expert_intermediate_size": 32,
    "num_experts": 4, "num_local_experts": 4, "n_routed_experts": 4, "moe_num_experts": 4,
    "num_experts_per_tok": 2, "moe_topk": 2, "top_k": 2, "moe_k": 2, "num_selected_experts": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "n_group": 1, "topk_group": 1,
    "max_position_embeddings": 128, "n_positions": 128, "n_ctx": 128, "max_sequence_length": 128,
    "seq_length": 128,
    "kv_lora_rank": 32, "q_lora_rank": 32, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8,
    "v_head_dim": 16, "qk_head_dim": 16,
    "first_k_dense_replace": 1, "vocab_size": VOCAB, "initializer_range": 0.1,
}

# A second, wider set of sizes, tried only when HF's own model cannot be built or
# run at the first (a rotary_dim or rope head dim of 64 left at its default next
# to a 16-wide head, a ratio the class asserts): 64-wide heads.
WIDE = {**TINY, **{k: 256 for k in ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")},
        **{k: 64 for k in ("head_dim", "kv_channels", "attention_head_dim", "qk_head_dim", "v_head_dim")},
        **{k: 512 for k in ("intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", "d_ff",
                            "decoder_ffn_dim", "mlp_dim", "dim_ff")},
        "qk_rope_head_dim": 32, "qk_nope_head_dim": 32, "kv_lora_rank": 64, "q_lora_rank": 64}
SIZES = {"tiny": TINY, "wide": WIDE}


def _mapped(cls, key: str) -> str:
    return getattr(cls, "attribute_map", {}).get(key, key)


def _shrink(defaults: dict, cls, sizes: dict = TINY) -> dict:
    """Overrides that make a config of class `cls` (its defaults `defaults`) tiny."""
    out = {}
    for key, value in sizes.items():
        real = _mapped(cls, key)
        if real in defaults and real not in out and isinstance(defaults[real], int) \
                and not isinstance(defaults[real], bool):
            out[real] = min(value, defaults[real]) if key in ("top_k", "moe_topk", "num_experts_per_tok",
                                                              "n_shared_experts", "num_shared_experts",
                                                              "first_k_dense_replace", "n_group",
                                                              "topk_group") else value
    # routed experts with no default top-k (the class's defaults alone do not run)
    if defaults.get("num_experts_per_tok", 0) is None and any(
            isinstance(defaults.get(k), int) for k in ("n_routed_experts", "num_experts", "num_local_experts")):
        out["num_experts_per_tok"] = 2
    _keep_head_dim_relations(defaults, out)
    heads = _mapped(cls, "num_attention_heads")
    kv = "num_key_value_heads"
    if isinstance(defaults.get(kv), int) and isinstance(defaults.get(heads), int):
        out[kv] = 2 if defaults[kv] < defaults[heads] else out.get(heads, 4)
    # fields that must stay consistent with the ones set above are scaled with them
    _scale_heads(defaults, out, cls)
    for k, v in defaults.items():
        # a second vocabulary (gemma3n's per-layer input embedding, blt's hashed n-grams) no
        # larger than the ids need
        if (k.endswith("vocab") or "vocab_size" in k) and k not in out and _is_int(v) and v > VOCAB:
            out[k] = VOCAB
    _keep_every_layer_kind(defaults, cls, out, sizes)
    # special token ids must lie inside the tiny vocabulary
    spare = iter(range(VOCAB - 1, 0, -1))
    for k, v in defaults.items():
        if k.endswith(("token_id", "token_index")) and isinstance(v, int) and v >= VOCAB:
            out[k] = next(spare)
        elif k.endswith("token_id") and isinstance(v, list) and any(isinstance(i, int) and i >= VOCAB for i in v):
            out[k] = [i if i < VOCAB else next(spare) for i in v]
    for k, v in defaults.items():   # nested sub-configs (text_config, ...)
        if isinstance(v, dict) and k.endswith("config") and "model_type" in v:
            from transformers import CONFIG_MAPPING
            # CONFIG_MAPPING is lazy: its .get() (the OrderedDict's) sees none of the
            # entries, so every nested config stayed full size; [] loads the class
            try:
                sub = CONFIG_MAPPING[v["model_type"]]
            except KeyError:
                continue
            out[k] = {**v, **_shrink(v, sub, sizes)}
    return out


def _keep_every_layer_kind(defaults: dict, cls, out: dict, sizes: dict) -> None:
    """Per-layer lists (layer_types, layers_block_type, ...): the tiny model keeps the
    first and last layer and the first layer of every other kind any list names, so
    a hybrid stays a hybrid (a conv or linear-attention layer next to an attention
    one, a sliding and a full one) and is checked as one; num_hidden_layers grows to
    match. A per-layer size the table names takes its tiny value; lists of layer
    indices (moe_layers, full_attn_idxs) are renumbered, as are per-layer references
    to a source layer (kolibri1_1's kv_source_layers: the layer whose K/V each one
    reads; a layer reading another's is kept, with its source), per-layer overrides
    (`per_layer_config`) kept for the kept layers, and counts of layers in a role
    (`num_kv_shared_layers`) scaled to the new layer count."""
    n_key = _mapped(cls, "num_hidden_layers")
    n = defaults.get(n_key)
    if not isinstance(n, int) or n <= N_LAYERS:
        return

    def is_indices(v):      # layer numbers, increasing (all of them is still a list of indices)
        return bool(v) and all(_is_int(i) for i in v) and 0 <= v[0] and all(a < b for a, b in zip(v, v[1:])) \
            and v[-1] < n
    def is_sources(v):      # per layer, the index of an earlier (or its own) layer that one reads
        return len(v) == n and all(_is_int(i) and 0 <= i <= j and v[i] == i for j, i in enumerate(v)) \
            and len(set(v)) > 2 and any(i != j for j, i in enumerate(v))
    lists = {k: v for k, v in defaults.items() if isinstance(v, (list, tuple))}
    indices = {k: v for k, v in lists.items() if is_indices(v)}
    sources = {k: v for k, v in lists.items() if k not in indices and is_sources(v)}
    per_layer = {k: v for k, v in lists.items() if len(v) == n and k not in indices and k not in sources}
    keep = {0, n - 1}
    for v in per_layer.values():
        first = {}
        for i, x in enumerate(v):
            first.setdefault(repr(x), i)
        keep |= set(first.values())
    for v in indices.values():               # a layer listed and one not
        keep.add(v[0])
        keep.add(next((i for i in range(n) if i not in v), 0))
    for v in sources.values():               # a layer reading another's (kolibri1_1's kv_source_layers)
        keep.add(next(j for j, i in enumerate(v) if i != j))
    for v in sources.values():               # ... and every layer a kept one reads
        keep |= {v[j] for j in keep}
    keep = sorted(keep)
    new = {old: j for j, old in enumerate(keep)}
    n_new = len(keep)
    for k, v in per_layer.items():
        kept = [v[i] for i in keep]
        if k in sizes and all(_is_int(i) for i in kept):
            kept = [sizes[k]] * n_new
        out[k] = kept
    for k, v in indices.items():
        out[k] = [new[i] for i in v if i in new]
    for k, v in sources.items():
        out[k] = [new[v[i]] for i in keep]
    for k, v in defaults.items():
        if k == "per_layer_config" and isinstance(v, dict):
            out[k] = _per_layer(v, new, defaults, out)
        elif k.startswith("num_") and k.endswith("_layers") and k != n_key and _is_int(v) and N_LAYERS <= v <= n:
            out[k] = n_new if v == n else v * n_new // n
    if n_new > out.get(n_key, N_LAYERS):
        out[n_key] = n_new


# per-head widths: their defaults may be tied (DeepSeek-V3: head_dim = qk_rope_head_dim,
# the width its rotary embedding is built for; qk_head_dim = nope + rope)
HEAD_DIMS = ("head_dim", "kv_channels", "attention_head_dim", "qk_head_dim", "v_head_dim",
             "qk_rope_head_dim", "qk_nope_head_dim")


def _keep_head_dim_relations(defaults: dict, out: dict) -> None:
    """Where the fixed tiny head widths break an equality or a sum the defaults hold
    among them (head_dim 16 beside qk_rope_head_dim 8, defaults 64 and 64), shrink
    all of them instead by one power of two, down to at most 32 wide and still even
    (rotary pairs): equalities, sums and ratios among them then hold as in the defaults."""
    keys = [k for k in HEAD_DIMS if k in out and isinstance(defaults.get(k), int) and defaults[k] > 0]
    def held(a, b, c=None):     # a == b, or a == b + c
        return lambda d: d[a] == d[b] + (d[c] if c else 0)
    relations = [held(a, b) for a in keys for b in keys] + [held(a, b, c) for a in keys for b in keys for c in keys]
    if all(r(out) for r in relations if r(defaults)):
        return
    vals = [defaults[k] for k in keys]
    f = 1
    while max(vals) // f > 32 and all(v % (4 * f) == 0 for v in vals):
        f *= 2
    out.update({k: defaults[k] // f for k in keys})


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _scale_heads(defaults: dict, out: dict, cls) -> None:
    """Head counts the table does not name, in a model with none it names
    (mamba2's `num_heads`): scaled so heads x head_dim keeps its default
    ratio to the width (mamba2 asserts hidden_size * expand == num_heads *
    head_dim), i.e. by the width's factor over head_dim's."""
    width, hd = _mapped(cls, "hidden_size"), _mapped(cls, "head_dim")
    if not (_is_int(defaults.get(width)) and width in out) or _mapped(cls, "num_attention_heads") in defaults:
        return   # only where the table names a head_dim and no head count
    if not (_is_int(defaults.get(hd)) and hd in out):
        return
    factor = out[width] / defaults[width] * defaults[hd] / out[hd]
    named = {_mapped(cls, k) for k in TINY} | {"num_key_value_heads"}
    for k, v in defaults.items():
        if k.endswith("heads") and k not in named and k not in out and _is_int(v) and v > 1:
            out[k] = max(1, min(v, round(v * factor)))


def _keep_group_heads(defaults: dict, out: dict, cls) -> bool:
    """Where the class rejects the tiny config: a head count the table does not name
    that the defaults keep within one key-value group, larger than the tiny group
    (kolibri1_1's index_num_heads, 12 of 48 query heads over 4 kv heads, which it
    asserts), scaled to the tiny group by its default share of it. Returns whether
    one was."""
    heads, kv = _mapped(cls, "num_attention_heads"), "num_key_value_heads"
    if not all(_is_int(defaults.get(k)) and defaults[k] > 0 and _is_int(out.get(k)) for k in (heads, kv)):
        return False
    group, tiny = defaults[heads] // defaults[kv], out[heads] // out[kv]
    named = {_mapped(cls, k) for k in TINY} | {kv}
    changed = False
    for k, v in defaults.items():
        if k.endswith("heads") and k not in named and k not in out and _is_int(v) and tiny < v <= group:
            out[k] = max(1, tiny * v // group)
            changed = True
    return changed


def _per_layer(per_layer: dict, renumber: dict, defaults: dict, out: dict) -> dict:
    """`per_layer_config` ({layer index: overrides}) for the layers kept (`renumber`:
    old index -> new), each overriding size scaled by the factor its global field
    was (a 512-wide head next to a 256-wide global one stays twice the tiny one)."""
    kept = {}
    for key, overrides in per_layer.items():
        new = renumber.get(int(key))
        if new is None:
            continue
        scaled = {}
        for f, v in overrides.items():
            if _is_int(v) and _is_int(defaults.get(f)) and f in out and defaults[f]:
                v = max(1, round(v * out[f] / defaults[f]))
            scaled[f] = v
        kept[f"{new:02d}" if isinstance(key, str) else new] = scaled
    return kept


WIDTHS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")
ADAPTER_WIDTHS = ("_in_dim", "_out_dim", "_input_size", "_output_size")


def _shrunk(defaults: dict, out: dict, sizes: dict, found=None) -> dict:
    """{(size name, default value): tiny value} over the config and its nested configs."""
    found = {} if found is None else found
    for k, v in out.items():
        if k in sizes and _is_int(defaults.get(k)) and _is_int(v):
            found[(k, defaults[k])] = v
        elif isinstance(v, dict) and isinstance(defaults.get(k), dict):
            _shrunk(defaults[k], v, sizes, found)
    return found


def _follow(defaults: dict, out: dict, shrunk: dict) -> None:
    """A variant of a size the table names (`hidden_size_global` beside a nested
    global config's `hidden_size`), at a default that size had somewhere in the
    config, follows it to its tiny value (blt's local decoder projects the
    global transformer's output with it); so does an adapter's input or
    output width (`*_in_dim`, `*_out_dim`, `*_input_size`, `*_output_size`) at a model width's default
    (dots3_note's vision adapter, from its own width to the text model's)."""
    for k, v in defaults.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            _follow(v, out[k], shrunk)
        elif out.get(k, v) == v and _is_int(v):   # not set (a nested config's out holds all its keys)
            for (name, old), new in shrunk.items():
                if v == old and (k.startswith(name + "_") or (name in WIDTHS and k.endswith(ADAPTER_WIDTHS))):
                    out[k] = new
                    break


def tiny_config(model_type: str, sizes: str = "tiny"):
    """The config of a tiny `model_type`, from its own class's defaults (SIZES[sizes])."""
    from transformers import CONFIG_MAPPING
    cls = CONFIG_MAPPING[model_type]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        defaults = cls().to_dict()
        out = _shrink(defaults, cls, SIZES[sizes])
        _follow(defaults, out, _shrunk(defaults, out, SIZES[sizes]))
        try:
            cfg = cls(**out)
        except Exception:
            if not _keep_group_heads(defaults, out, cls):
                raise
            cfg = cls(**out)
    if hasattr(cfg, "is_decoder"):
        cfg.is_decoder = True   # encoders used as causal LMs (BertLMHeadModel) ask for it
    return cfg


def _perturb(model, seed: int) -> None:
    """Move constant 1-d parameters (norm gains at 1, biases at 0) off their
    init, so a mistake in folding them shows in the numbers."""
    import torch
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1 and p.is_floating_point() and p.numel() > 1 and bool((p == p[0]).all()) \
                    and float(p[0]) in (0.0, 1.0):
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


def tiny_model(model_type: str, seed: int = 0, sizes: str = "tiny"):
    """A tiny random-weight HF causal LM of `model_type`, eager attention, float32, eval."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.manual_seed(seed)
    cfg = tiny_config(model_type, sizes)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    _perturb(model, seed + 1)
    return model.float().eval()


def rel_err(got, want) -> float:
    import torch
    finite = torch.isfinite(want)
    if not bool(finite.any()):
        return 0.0
    scale = want[finite].abs().max().clamp_min(1e-12)
    return ((got.float() - want).abs()[finite].max() / scale).item()


def _reason(exc: BaseException) -> str:
    import fxlens
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    kind = type(exc).__name__ if isinstance(exc, fxlens.FxlensError) else f"untyped {type(exc).__name__}"
    return f"{kind}: {text[:400]}"


def check_type(model_type: str) -> dict:
    """Build, capture and check one model type. Returns its row of the matrix."""
    import torch
    import fxlens
    row = {"model_type": model_type, "status": None, "reason": "", "sites": [], "n_layers": None,
           "capture": None, "processed": None, "processed_reason": "", "checks": {}}
    # --- HF itself (at the tiny sizes, else the wide ones) ------------------------------
    for sizes in SIZES:
        try:
            hf = tiny_model(model_type, sizes=sizes)
            vocab = hf.get_input_embeddings().weight.shape[0]
            ids = torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(2))
            with torch.no_grad():
                out = hf(ids, use_cache=False, output_hidden_states=True)
            want = out.logits.float().log_softmax(-1)
            hidden = out.hidden_states
            if not bool(torch.isfinite(want).all()):
                raise ValueError("HF's logits are not finite")
            row["sizes"] = sizes
            break
        except Exception as exc:
            row.update(status="hf-broken", reason=f"{type(exc).__name__}: {str(exc).strip()[:300]}")
    else:
        return row
    row["status"], row["reason"] = None, ""
    # --- fxlens, unprocessed ---------------------------------------------------------------
    try:
        cap = fxlens.capture(hf)
        row["capture"] = str(cap.info) if getattr(cap, "info", None) else None
        model = fxlens.from_pretrained_no_processing(cap, self_check=False)
        logits, cache = model.run_with_cache(ids)
    except Exception as exc:
        row.update(status="capture-failed" if isinstance(exc, fxlens.CaptureError) else "refused",
                   reason=_reason(exc))
        if not isinstance(exc, fxlens.FxlensError):
            row["traceback"] = traceback.format_exc()[-2000:]
        return row
    names = list(model.hook_names)
    row["sites"] = sorted({n.split(".", 2)[-1] if n.startswith("blocks.") else n for n in names})
    n_layers = model.cfg.n_layers
    row["n_layers"] = n_layers
    failures = []
    err = rel_err(logits.float().log_softmax(-1), want)
    row["checks"]["log_probs"] = err
    if not err <= RTOL:
        failures.append(f"log-probs differ from HF's by {err:.3g} (relative)")
    layer_cfgs = model.cfg.layers if len(model.cfg.layers) == n_layers else [None] * n_layers
    kinds = [layer_kind(lc) for lc in layer_cfgs]
    row["layers"] = {k: kinds.count(k) for k in dict.fromkeys(kinds)}
    missing = [f"blocks.{L}.{s}" for L, lc in enumerate(layer_cfgs) for s in layer_sites(lc)
               if f"blocks.{L}.{s}" not in names]
    if missing:
        failures.append(f"missing sites {missing[:4]}{' ...' if len(missing) > 4 else ''}")
    # HF records hidden states for the blocks that ran: one the forward skips (an empty
    # block: Mllama's cross-attention layers on text alone) records none
    ran = [L for L, lc in enumerate(layer_cfgs) if lc is None or lc.token_mixer != "none" or lc.has_mlp]
    if len(hidden) >= len(ran):
        errs = [rel_err(cache[f"blocks.{L}.hook_resid_pre"], hidden[k].float())
                for k, L in enumerate(ran) if f"blocks.{L}.hook_resid_pre" in cache]
        row["checks"]["resid_pre"] = max(errs) if errs else None
        if errs and not max(errs) <= RTOL:
            # HF's Mamba family lists each block's output, not its input (no embedding
            # first): hidden_states[L] is then resid_post[L] (the last one normed)
            post = [rel_err(cache[f"blocks.{L}.hook_resid_post"], hidden[k].float())
                    for k, L in enumerate(ran[:-1]) if f"blocks.{L}.hook_resid_post" in cache]
            if post and max(post) <= RTOL and len(hidden) == len(ran) + 1:
                row["checks"]["resid_post"] = max(post)
            else:
                failures.append(f"hook_resid_pre differs from HF's hidden_states by {max(errs):.3g}")
    for L in range(n_layers):
        key = f"blocks.{L}.attn.hook_pattern"
        if key in cache:
            p = cache[key].float()
            dev = (p.sum(-1) - 1).abs().max().item()
            row["checks"]["pattern_rows"] = max(row["checks"].get("pattern_rows", 0.0), dev)
            if not dev <= 1e-4:
                failures.append(f"{key} rows sum to 1 +- {dev:.3g}")
                break
    row["status"] = "pass" if not failures else "wrong"
    row["reason"] = "; ".join(failures)
    # --- fxlens, processed -----------------------------------------------------------------
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            processed = fxlens.from_pretrained(cap, self_check=False)
            got = processed(ids).float().log_softmax(-1)
        perr = rel_err(got, want)
        row["checks"]["processed_log_probs"] = perr
        row["processed"] = "pass" if perr <= RTOL else "wrong"
        if perr > RTOL:
            row["processed_reason"] = f"log-probs differ from HF's by {perr:.3g} (relative)"
    except Exception as exc:
        row["processed"] = "refused"
        row["processed_reason"] = _reason(exc)
    return row


def _child(model_type: str, conn) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    try:
        row = check_type(model_type)
    except BaseException as exc:  # noqa: BLE001 - the parent records whatever happened
        row = {"model_type": model_type, "status": "crashed", "reason": f"{type(exc).__name__}: {exc}"[:400],
               "traceback": traceback.format_exc()[-2000:]}
    conn.send(row)
    conn.close()


def run_one(model_type: str, timeout: float) -> dict:
    """`check_type` in a forked subprocess (torch and transformers already imported)."""
    ctx = mp.get_context("fork")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(model_type, child))
    t0 = time.monotonic()
    proc.start()
    child.close()
    row = None
    if parent.poll(timeout):
        try:
            row = parent.recv()
        except EOFError:
            row = None
    proc.join(5)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if row is None:
        if time.monotonic() - t0 >= timeout:
            row = {"model_type": model_type, "status": "timeout", "reason": f"no result within {timeout:.0f} s"}
        else:
            row = {"model_type": model_type, "status": "crashed", "reason": f"subprocess exit code {proc.exitcode}"}
    row["seconds"] = round(time.monotonic() - t0, 1)
    return row


def model_types() -> list[str]:
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    return list(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


COUNTED = ("pass", "wrong", "refused", "capture-failed", "timeout", "crashed")


def summary(rows: list[dict]) -> dict:
    counted = [r for r in rows if r["status"] in COUNTED]
    passed = [r for r in counted if r["status"] == "pass"]
    proc = [r for r in counted if r.get("processed") == "pass"]
    # passing types with a layer that is not attention + MLP (a mixer, no MLP, a skipped block)
    mixed = [r for r in passed if any(k != "attn+mlp" for k in r.get("layers") or {})]
    return {"types": len(rows), "hf_broken": len(rows) - len(counted), "counted": len(counted),
            "pass": len(passed), "pass_rate": round(len(passed) / len(counted), 4) if counted else None,
            "processed_pass": len(proc), "pass_with_other_layers": len(mixed)}


def write_docs(rows: list[dict], meta: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    s = summary(rows)
    (out_dir / "support.json").write_text(json.dumps({"summary": s, "meta": meta, "rows": rows}, indent=1))
    core = set(CORE_SITES)
    lines = [
        "# Model types fxlens supports",
        "",
        "Generated by `scripts/support_matrix.py` -- do not edit by hand. Every `model_type` of",
        "`transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES`, built tiny from",
        "its own config class (random weights, eager attention, fixed seed), captured and instrumented.",
        "Status `(wide)`: HF's model could not be built or run at the tiny sizes (64-wide model,",
        "16-wide heads) and was at the wide ones (256-wide model, 64-wide heads).",
        "",
        f"**{s['pass']} of {s['counted']} model types pass ({100 * (s['pass_rate'] or 0):.1f}%)**; "
        f"{s['hf_broken']} whose HF model itself cannot be built tiny or run are listed and not counted. "
        f"Processed (`fxlens.from_pretrained`, log-probs equal HF's): {s['processed_pass']} of {s['counted']}. "
        f"{s.get('pass_with_other_layers', 0)} of the passing types have layers other than attention + MLP "
        f"(state-space, linear-attention or convolution mixers, blocks without an MLP, skipped blocks); "
        f"{s['pass'] - s.get('pass_with_other_layers', 0)} have attention and an MLP in every layer.",
        "",
        f"transformers {meta.get('transformers')}, torch {meta.get('torch')}; "
        f"command: `{meta.get('command')}`.",
        "",
        "Pass means: log-probs equal HF's (relative 1e-4); every layer has "
        + ", ".join(f"`{c}`" for c in CORE_SITES)
        + " -- a layer whose token mixer computes no attention scores has `hook_mixer_out` in place of the "
        "attention's two, a layer without an MLP no `hook_mlp_out` (column `layers`: each kind's count) -- ; "
        "`hook_resid_pre` equals HF's `hidden_states[L]` (HF's Mamba family lists block outputs: "
        "`hook_resid_post`); pattern rows sum to 1. "
        "Processed: `from_pretrained` with its default processing, log-probs equal HF's. "
        "Capture: how `torch.export` succeeded (`model.capture_info`). "
        "Sites: the per-block sites found (beyond the core ones) and the model-level sites.",
        "",
        "| model type | status | processed | capture | layers | sites | reason |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: r["model_type"]):
        sites = [x for x in r.get("sites") or [] if x not in core]
        cap = r.get("capture") or {}
        cap_s = cap.get("method", "") if isinstance(cap, dict) else str(cap)
        reason = r.get("reason", "") or ""
        if r.get("processed") not in (None, "pass") and r.get("processed_reason"):
            reason = (reason + "; " if reason else "") + "processed: " + r["processed_reason"]
        reason = reason.replace("|", "\\|").replace("\n", " ")
        status = r["status"] + (" (wide)" if r.get("sizes") == "wide" else "")
        layers = " ".join(f"{k} {n}" for k, n in (r.get("layers") or {}).items())
        lines.append(f"| {r['model_type']} | {status} | {r.get('processed') or ''} | {cap_s} | {layers} | "
                     f"{' '.join(sites)} | {reason} |")
    (out_dir / "SUPPORT.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types (default: all)")
    ap.add_argument("--timeout", type=float, default=600.0,
                    help="seconds per model type (a hybrid's chunked-scan export alone takes up to two minutes)")
    ap.add_argument("--jobs", type=int, default=1, help="model types checked at once (one thread each)")
    ap.add_argument("--out", default=str(ROOT / "docs"), help="folder for SUPPORT.md and support.json")
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--merge", action="store_true",
                    help="with --only: update those rows of an existing support.json")
    args = ap.parse_args(argv)
    import torch
    import transformers
    import fxlens  # noqa: F401 - imported once, before forking
    types = model_types()
    if args.only:
        wanted = args.only.split(",")
        unknown = [t for t in wanted if t not in types]
        if unknown:
            print(f"not causal-LM model types: {unknown}", file=sys.stderr)
            return 2
        types = wanted
    rows = []
    # --jobs N: N model types at once, each in its own forked one-thread child (the
    # parent's threads only wait on their child's pipe)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        done = pool.map(lambda t: run_one(t, args.timeout), types)
        for row in done:
            t = row["model_type"]
            rows.append(row)
            checks = row.get("checks") or {}
            errs = " ".join(f"{k}={checks[k]:.1e}" for k in ("log_probs", "processed_log_probs")
                            if isinstance(checks.get(k), float))
            why = "; ".join(x for x in (row.get("reason"), row.get("processed_reason") and
                                        "processed: " + row["processed_reason"]) if x)
            print(f"{t:32s} {row['status']:15s} {str(row.get('processed') or ''):8s} {row['seconds']:6.1f}s "
                  f"{errs} {why[:150]}", flush=True)
    out_dir = Path(args.out)
    if args.merge and (out_dir / "support.json").exists():
        old = {r["model_type"]: r for r in json.loads((out_dir / "support.json").read_text())["rows"]}
        old.update({r["model_type"]: r for r in rows})
        rows = list(old.values())
    s = summary(rows)
    print(json.dumps(s))
    if not args.no_write:
        meta = {"transformers": transformers.__version__, "torch": torch.__version__,
                "command": "nice -n 10 .venv/bin/python scripts/support_matrix.py",
                "date": time.strftime("%Y-%m-%d")}
        write_docs(rows, meta, out_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
