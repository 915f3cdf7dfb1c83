"""Record TransformerLens 3.9 reference activations for tests/test_tl_conventions.py.

    .venv/bin/python scripts/tl_references.py [ARCH ...]      # default: every arch below

For each architecture a tiny random-weight HF model (tests/tiny_models.py's sizes:
vocab 256, d_model 64, 2 layers, 4 heads of 16, d_mlp 128) is built, saved as a
checkpoint, and run through TransformerLens twice: `from_pretrained_no_processing`
(raw) and `from_pretrained` with its defaults (processed). Every activation of a
default `run_with_cache`, the logits and the hook names/shapes are written to
tests/data/tl_ref/<arch>/.

TransformerLens 3.9 only loads official model names, and fetches their configs from
the Hub. It is driven offline here: `AutoConfig.from_pretrained` inside its loader
returns the tiny HF config, and the HF model is passed as `hf_model`, so TL's own
config conversion (convert_hf_model_config) and weight conversion
(pretrained/weight_conversions/*) run on the tiny weights. For names whose TL config
is written out by hand (gemma*, olmo*) the sizes TL hard-codes are replaced by the
tiny config's; every convention flag (normalisation, post-norms, soft caps, q/k norm,
...) stays TL's. ARCH -> official name is the reference implementation's business,
kept in this script only; fxlens itself never sees it.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import traceback
from pathlib import Path
from unittest import mock

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import tiny_models as tm  # noqa: E402

OUT = ROOT / "tests" / "data" / "tl_ref"

# arch -> (TransformerLens official name, config source): "tiny" = tests/tiny_models.py,
# otherwise (model_type, kwargs) at the same sizes.
_TINY = dict(vocab_size=tm.VOCAB, hidden_size=tm.D_MODEL, num_hidden_layers=tm.N_LAYERS,
             num_attention_heads=tm.N_HEADS, max_position_embeddings=tm.N_CTX, **tm._SPECIAL)
ARCHS: dict[str, tuple[str, object]] = {
    "gemma": ("google/gemma-2b", "tiny"),
    "gemma2": ("google/gemma-2-2b", "tiny"),
    "gemma3": ("google/gemma-3-1b-pt",
               ("gemma3_text", dict(tm._LLAMA_LIKE, head_dim=tm.D_HEAD, hidden_activation="gelu_pytorch_tanh",
                                    query_pre_attn_scalar=tm.D_HEAD, sliding_window=tm.N_CTX,
                                    layer_types=["sliding_attention", "full_attention"],
                                    rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                                                     "sliding_attention": {"rope_type": "default",
                                                                           "rope_theta": 1e4}}))),
    "gptj": ("EleutherAI/gpt-j-6B",
             ("gptj", dict(vocab_size=tm.VOCAB, n_embd=tm.D_MODEL, n_layer=tm.N_LAYERS, n_head=tm.N_HEADS,
                           n_inner=4 * tm.D_MODEL, n_positions=tm.N_CTX, rotary_dim=tm.D_HEAD // 2,
                           resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **tm._SPECIAL))),
    # TL's phi conversion has no grouped kv heads: tiny_models' phi with one kv head per head
    "phi": ("microsoft/phi-2", ("phi", dict(tm.CONFIGS["phi"][1], num_key_value_heads=tm.N_HEADS))),
    "phi3": ("microsoft/Phi-3-mini-4k-instruct", "tiny"),
    "qwen3": ("Qwen/Qwen3-0.6B", "tiny"),
    "olmo": ("allenai/OLMo-1B-hf", ("olmo", dict(tm._LLAMA_LIKE, num_key_value_heads=tm.N_HEADS))),
    "olmo2": ("allenai/OLMo-2-0425-1B", ("olmo2", dict(tm._LLAMA_LIKE, num_key_value_heads=tm.N_HEADS))),
    "mixtral": ("mistralai/Mixtral-8x7B-v0.1", "tiny"),
    "gpt_neo": ("EleutherAI/gpt-neo-125M",
                ("gpt_neo", dict(vocab_size=tm.VOCAB, hidden_size=tm.D_MODEL, num_layers=tm.N_LAYERS,
                                 num_heads=tm.N_HEADS, intermediate_size=4 * tm.D_MODEL,
                                 max_position_embeddings=tm.N_CTX, window_size=4,
                                 attention_types=[[["global", "local"], 1]], resid_dropout=0.0,
                                 embed_dropout=0.0, attention_dropout=0.0, **tm._SPECIAL))),
    "mistral": ("mistralai/Mistral-7B-v0.1", "tiny"),
    "qwen2": ("Qwen/Qwen2-0.5B", "tiny"),
    "olmoe": ("allenai/OLMoE-1B-7B-0924",
              ("olmoe", dict(tm._LLAMA_LIKE, num_key_value_heads=tm.N_HEADS, num_experts=4, num_experts_per_tok=2))),
    "apertus": ("swiss-ai/Apertus-8B-2509", ("apertus", dict(tm._LLAMA_LIKE, num_key_value_heads=tm.N_HEADS))),
    "bloom": ("bigscience/bloom-560m",
              ("bloom", dict(vocab_size=tm.VOCAB, hidden_size=tm.D_MODEL, n_layer=tm.N_LAYERS,
                             n_head=tm.N_HEADS, hidden_dropout=0.0, attention_dropout=0.0, **tm._SPECIAL))),
}


# Recorded only when named: fxlens does not instrument these yet (listed in the README).
NOT_YET: dict[str, str] = {}


def build_hf(arch: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    src = ARCHS[arch][1]
    if src == "tiny":
        return tm.tiny_model(arch, seed)
    model_type, kw = src
    cfg = AutoConfig.for_model(model_type, **kw)
    cfg.tie_word_embeddings = False
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager", dtype=torch.float32)
    one_plus_w = model_type.startswith("gemma")
    tm._perturb(model, one_plus_w, torch.Generator().manual_seed(seed + 1))
    return model.float().eval()


def _hand_written_sizes(hf_cfg) -> dict:
    """The size fields TL hard-codes for name-configured models, read from `hf_cfg`."""
    n_layers = hf_cfg.num_hidden_layers
    sizes = dict(d_model=hf_cfg.hidden_size, n_heads=hf_cfg.num_attention_heads,
                 d_head=getattr(hf_cfg, "head_dim", None) or hf_cfg.hidden_size // hf_cfg.num_attention_heads,
                 d_mlp=hf_cfg.intermediate_size, n_layers=n_layers, n_ctx=hf_cfg.max_position_embeddings,
                 d_vocab=hf_cfg.vocab_size, n_key_value_heads=hf_cfg.num_key_value_heads,
                 eps=getattr(hf_cfg, "rms_norm_eps", None) or getattr(hf_cfg, "layer_norm_eps", 1e-5))
    sizes["rotary_dim"] = sizes["d_head"]
    # TL writes gemma-2b's act_fn as "gelu"; HF runs the checkpoint's hidden_activation
    if getattr(hf_cfg, "hidden_activation", None):
        sizes["act_fn"] = hf_cfg.hidden_activation
    layer_types = getattr(hf_cfg, "layer_types", None)
    if getattr(hf_cfg, "sliding_window", None) and layer_types:
        sizes["attn_types"] = ["local" if t == "sliding_attention" else "global" for t in layer_types]
        sizes["window_size"] = hf_cfg.sliding_window
    else:
        sizes["attn_types"] = ["global"] * n_layers
    rope = getattr(hf_cfg, "rope_parameters", None) or {}
    if "full_attention" in rope:
        sizes["rotary_base"] = rope["full_attention"]["rope_theta"]
        sizes["rotary_base_local"] = rope["sliding_attention"]["rope_theta"]
        sizes["rotary_scaling_factor"] = 1.0
    elif "rope_theta" in rope:
        sizes["rotary_base"] = rope["rope_theta"]
    return sizes


def run_tl(official: str, hf_model, processed: bool):
    import transformer_lens.loading_from_pretrained as loading
    from transformer_lens import HookedTransformer

    hf_cfg = copy.deepcopy(hf_model.config)
    hf_cfg.architectures = [type(hf_model).__name__]
    # transformers 5 keeps rotary fields in rope_parameters; TL 3.9 still reads some as attributes
    for key, value in (getattr(hf_cfg, "rope_parameters", None) or {}).items():
        if key == "partial_rotary_factor" and not hasattr(hf_cfg, key):
            setattr(hf_cfg, key, value)
    original = loading.convert_hf_model_config

    def convert(name, **kw):
        cfg_dict = original(name, **kw)
        if cfg_dict["d_model"] != hf_cfg.hidden_size:   # a hand-written TL config: take the tiny sizes
            cfg_dict.update({k: v for k, v in _hand_written_sizes(hf_cfg).items()
                             if k in cfg_dict or k in ("window_size", "rotary_base_local")})
        cfg_dict["tokenizer_name"] = None                # no tokenizer download; tests pass tokens
        return cfg_dict

    with mock.patch.object(loading.AutoConfig, "from_pretrained", lambda *a, **k: hf_cfg), \
            mock.patch.object(loading, "convert_hf_model_config", convert):
        load = HookedTransformer.from_pretrained if processed else HookedTransformer.from_pretrained_no_processing
        model = load(official, hf_model=hf_model, device="cpu", dtype=torch.float32)
    return model.eval()


def record(arch: str) -> dict:
    official = ARCHS[arch][0]
    hf = build_hf(arch)
    out = OUT / arch
    (out / "hf").mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(out / "hf", safe_serialization=True)
    tokens = torch.randint(3, hf.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(7))
    save_file({"tokens": tokens}, out / "tokens.safetensors")
    with torch.no_grad():
        hf_logits = hf(tokens).logits
    meta = {"official_name": official, "modes": {}}
    for mode in ("raw", "processed"):
        model = run_tl(official, hf, processed=(mode == "processed"))
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens)
        acts = {k: v.detach().float().clone(memory_format=torch.contiguous_format) for k, v in cache.items()}
        save_file(acts, out / f"{mode}.safetensors")
        save_file({"logits": logits.float().contiguous()}, out / f"{mode}_logits.safetensors")
        lp = torch.log_softmax(logits.float(), -1)
        hf_lp = torch.log_softmax(hf_logits.float(), -1)
        meta["modes"][mode] = {
            "hooks": {k: list(v.shape) for k, v in cache.items()},
            "tl_vs_hf_logprob_max_abs": (lp - hf_lp).abs().max().item(),
            "cfg": {k: (v if isinstance(v, (int, float, str, bool, type(None), list)) else str(v))
                    for k, v in model.cfg.to_dict().items()},
        }
        print(f"{arch} {mode}: {len(cache)} hooks, TL vs HF log-prob max |diff| "
              f"{meta['modes'][mode]['tl_vs_hf_logprob_max_abs']:.2e}")
    (out / "hooks.json").write_text(json.dumps(meta, indent=1, default=str))
    return meta


def write_readme(done: dict[str, dict], failed: dict[str, str]) -> None:
    from importlib.metadata import version

    import transformers

    lines = [
        "# TransformerLens references on more architectures",
        "",
        "Made by `scripts/tl_references.py` (see its docstring for how TransformerLens is",
        "driven offline) with transformer_lens "
        f"{version('transformer_lens')}, "
        f"transformers {transformers.__version__}, torch {torch.__version__}.",
        "",
        "Per arch: `hf/` (the tiny checkpoint: load it, never rebuild), `tokens.safetensors` [2, 8],",
        "`{raw,processed}.safetensors` (every default run_with_cache activation, float32; raw =",
        "from_pretrained_no_processing, processed = from_pretrained's defaults),",
        "`{raw,processed}_logits.safetensors`, `hooks.json` (names, shapes, TL's cfg, TL vs HF).",
        "`attn.hook_attn_scores` holds -inf at masked entries.",
        "",
        "| arch | TL official name | TL vs HF log-prob max abs (raw / processed) |",
        "|---|---|---|",
    ]
    for arch, meta in sorted(done.items()):
        m = meta["modes"]
        lines.append(f"| {arch} | {meta['official_name']} | {m['raw']['tl_vs_hf_logprob_max_abs']:.1e} / "
                     f"{m['processed']['tl_vs_hf_logprob_max_abs']:.1e} |")
    not_yet = {a: why for a, why in NOT_YET.items() if a not in done}
    if not_yet:
        lines += ["", "Not yet (the script can record them: `scripts/tl_references.py ARCH`):", ""]
        lines += [f"- {arch}: {why}" for arch, why in sorted(not_yet.items())]
    if failed:
        lines += ["", "Not recorded (TransformerLens failed on the tiny model):", ""]
        lines += [f"- {arch}: {why}" for arch, why in sorted(failed.items())]
    (OUT / "README.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> None:
    archs = argv or [a for a in ARCHS if a not in NOT_YET]
    done, failed = {}, {}
    for arch in archs:
        try:
            done[arch] = record(arch)
        except Exception as exc:  # noqa: BLE001 - a reference we cannot make is listed, not fatal
            failed[arch] = f"{type(exc).__name__}: {str(exc).strip()[:300]}"
            traceback.print_exc()
            print(f"{arch}: FAILED {failed[arch]}")
    # keep what earlier runs recorded
    for path in OUT.glob("*/hooks.json"):
        done.setdefault(path.parent.name, json.loads(path.read_text()))
    write_readme(done, failed)


if __name__ == "__main__":
    main(sys.argv[1:])
