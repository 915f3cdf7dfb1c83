"""The rest of TransformerLens's `HookedTransformer` and `HookedRootModule`
surface on HookedModel: token helpers, composition scores, the pieces of the
forward pass, devices, caching hooks, the opt-in site switches, weight
processing as methods, and the methods that cannot apply to a captured graph
(each raises `NotApplicableError` saying why and what to use).

`tests/data/transformerlens_public_names.txt` lists TransformerLens's public
names; `tests/test_tl_surface.py` checks each exists here or is refused.
"""

from __future__ import annotations

import functools
import warnings

import torch

from fxlens.interp.cache import apply_slice
from fxlens.errors import FxlensError, NotApplicableError, ProcessingError
from fxlens.discovery.names import is_opt_in
from fxlens.ir.params import ProcessingLog
from fxlens.ir.probe import SELF_CHECK_RTOL, check_on_probe, probe_tokens
from fxlens.passes.insert_hooks import CONTAINER
from fxlens.pipeline import reprocess

# Weight processing reruns the passes; it must keep log-probs (logits move by a
# per-position constant under center_unembed). As the load-time self-check:
# 1e-4 of the largest logit separates float32 rounding from a wrong rewrite.
REPROCESS_RTOL = SELF_CHECK_RTOL

# TransformerLens's opt-in switches -> the sites each one adds, per block
_OPT_IN_SWITCHES = {
    "use_attn_result": ("attn.hook_result",),
    "use_split_qkv_input": ("hook_q_input", "hook_k_input", "hook_v_input"),
    "use_hook_mlp_in": ("hook_mlp_in",),
    "use_attn_in": ("hook_attn_in",),
}

# sites whose position dim is third from last ([batch, pos, head, d]); others: second from last
_HEAD_SITES = ("hook_q", "hook_k", "hook_v", "hook_z", "hook_result")


def slice_positions(name: str, value: torch.Tensor, pos_slice) -> torch.Tensor:
    """`pos_slice` applied on the position dim of site `name`'s activation (third
    from last for q/k/v/z/result, else second from last: the query position of
    a pattern), as TransformerLens's caching hooks; values without one pass."""
    if pos_slice is None:
        return value
    pos_dim = -3 if name.removesuffix("_grad").endswith(_HEAD_SITES) else -2
    return apply_slice(value, pos_slice, pos_dim) if value.dim() >= -pos_dim else value


def _refused(name: str, why: str):
    """A TransformerLens method fxlens keeps by name only: calling it raises."""

    def method(self, *args, **kwargs):
        raise NotApplicableError(f"{name}: {why}")

    method.__name__ = name
    method.__doc__ = f"Not applicable to a captured graph: {why}"
    return method


class TransformerLensMixin:
    """Needs HookedModel's hook machinery, `cfg`, `tokenizer`, the weight views
    and `graph_module` / `spec` / `processing`."""

    is_caching = False      # TransformerLens's flag: caching hooks were added
    context_level = 0       # TransformerLens nests `hooks()` contexts by level; fxlens's undo exactly theirs

    # --- tokens ------------------------------------------------------------------------
    def to_single_str_token(self, int_token: int) -> str:
        """The string of one token id."""
        if isinstance(int_token, torch.Tensor) and int_token.numel() == 1:
            int_token = int(int_token)
        if not isinstance(int_token, int):
            raise TypeError(f"to_single_str_token takes one int token id, not {type(int_token).__name__}")
        return self.to_str_tokens(torch.tensor([int_token]))[0]

    def get_token_position(self, single_token, input, mode: str = "first", prepend_bos: bool | None = None,
                           padding_side: str | None = None) -> int:
        """Position of `single_token` (a one-token string, an id) in `input` (text,
        [pos] or [1, pos] ids): its first or last occurrence (`mode`). Text is
        tokenized with `prepend_bos` as `to_tokens` does, so positions agree with it."""
        if mode not in ("first", "last"):
            raise ValueError(f"mode={mode!r}; use 'first' or 'last'")
        tokens = self.to_tokens(input, prepend_bos=prepend_bos, padding_side=padding_side) \
            if isinstance(input, str) else torch.as_tensor(input)
        if tokens.dim() == 2:
            if tokens.shape[0] != 1:
                raise ValueError(f"get_token_position takes one sequence [pos] or [1, pos], not "
                                 f"{tuple(tokens.shape)}; index the batch first")
            tokens = tokens[0]
        if isinstance(single_token, str):
            single_token = self.to_single_token(single_token)
        elif isinstance(single_token, torch.Tensor):
            single_token = int(single_token.item())
        where = (tokens == single_token).nonzero().reshape(-1)
        if where.numel() == 0:
            raise ValueError(f"token {single_token} does not occur in the input ({tokens.numel()} tokens)")
        return int(where[0] if mode == "first" else where[-1])

    def set_tokenizer(self, tokenizer, default_padding_side: str = "right") -> None:
        """Use `tokenizer` from now on. fxlens prepends BOS itself (never twice), so
        the tokenizer need not add it. Missing pad / bos tokens default to eos."""
        from transformers import PreTrainedTokenizerBase

        if not isinstance(tokenizer, PreTrainedTokenizerBase):
            raise TypeError(f"set_tokenizer takes a transformers tokenizer, not {type(tokenizer).__name__}")
        if default_padding_side not in ("left", "right"):
            raise ValueError(f"default_padding_side={default_padding_side!r}; use 'left' or 'right'")
        tokenizer.padding_side = default_padding_side
        if tokenizer.eos_token is not None:
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            if tokenizer.bos_token is None:
                tokenizer.bos_token = tokenizer.eos_token
        self.tokenizer = tokenizer
        self.cfg.tokenizer_prepends_bos = len(tokenizer.encode("")) > 0

    # --- weights -----------------------------------------------------------------------
    @property
    def W_E_pos(self) -> torch.Tensor:
        """[d_vocab + n_ctx, d_model]: W_E over W_pos (learned positions only)."""
        if self.spec.pos_embed is None:   # not AttributeError: nn.Module would swallow the message
            raise FxlensError(f"W_E_pos: this model has no learned position embedding "
                              f"(positional_embedding_type={self.cfg.positional_embedding_type!r}); use W_E")
        return torch.cat([self.W_E, self.W_pos], dim=0)

    def all_head_labels(self) -> list[str]:
        return [f"L{l}H{h}" for l in range(self.cfg.n_layers) for h in range(self.cfg.n_heads)]

    def all_composition_scores(self, mode: str) -> torch.Tensor:
        """[layer1, head1, layer2, head2]: how much head (l1, h1)'s OV output is read
        by head (l2, h2)'s Q, K or V (`mode`), as TransformerLens (Elhage et al.):
        |L R|_F / (|L|_F |R|_F) with L = OV of the first head and R = QK (Q), QK^T (K)
        or OV (V) of the second; zero unless l1 < l2.

        Computed from the factors, never the d_model x d_model products:
        |A M B|_F^2 = sum((A^T A M) * (M B B^T)) with M [d_head, d_head]."""
        if mode not in ("Q", "K", "V"):
            raise ValueError(f"mode must be one of ['Q', 'K', 'V'] not {mode}")
        ov = self.OV
        right = ov if mode == "V" else (self.QK if mode == "Q" else self.QK.T)
        # float64: the score is a ratio of norms of products; squaring in float32 loses digits
        a_l, b_l = ov.A.double(), ov.B.double()               # [L, H, m, d], [L, H, d, m]
        a_r, b_r = right.A.double(), right.B.double()         # [L, H, m, d'], [L, H, d', m]
        gram_a = a_l.transpose(-2, -1) @ a_l                  # [L, H, d, d]
        gram_b = b_r @ b_r.transpose(-2, -1)                  # [L, H, d', d']
        # M[l1, h1, l2, h2] = B_l[l1, h1] @ A_r[l2, h2]: [L, H, L, H, d, d']
        m = torch.einsum("ahdm,bgme->ahbgde", b_l, a_r)
        comp = ((gram_a[:, :, None, None] @ m) * (m @ gram_b[None, None])).sum((-2, -1)).clamp_min(0).sqrt()

        def norm(fm):  # |A B|_F per head
            g_a = fm.A.double().transpose(-2, -1) @ fm.A.double()
            g_b = fm.B.double() @ fm.B.double().transpose(-2, -1)
            return (g_a * g_b).sum((-2, -1)).clamp_min(0).sqrt()

        scores = comp / norm(ov)[:, :, None, None] / norm(right)[None, None]
        n = self.cfg.n_layers
        later = torch.arange(n)[:, None, None, None] < torch.arange(n)[None, None, :, None]
        scores = torch.where(later.to(scores.device), scores, torch.zeros_like(scores))
        return scores.to(self.W_E.dtype)

    # --- the pieces of the forward pass ------------------------------------------------
    def input_to_embed(self, input, prepend_bos: bool | None = None, padding_side: str | None = None,
                       attention_mask: torch.Tensor | None = None, past_kv_cache=None):
        """(residual entering block 0 [batch, pos, d_model], tokens, None, attention_mask):
        TransformerLens's tuple, from the graph run up to blocks.0.hook_resid_pre.
        fxlens has no shortformer positions (always None)."""
        if past_kv_cache is not None:
            raise NotApplicableError("input_to_embed: past_kv_cache is TransformerLens's own KV cache "
                                     "object; fxlens's generate(use_past_kv_cache=True) keeps its own")
        # texts of different lengths: padded, and their mask returned (as TransformerLens)
        tokens, attention_mask = self._tokens_and_mask(input, prepend_bos, padding_side, attention_mask)
        extra = {} if attention_mask is None else {"attention_mask": attention_mask}
        residual = self.forward(tokens, stop_at_layer=0, **extra)
        return residual, tokens, None, attention_mask

    def get_pos_offset(self, past_kv_cache, batch_size: int) -> int:
        if past_kv_cache is not None:
            raise NotApplicableError("get_pos_offset: past_kv_cache is TransformerLens's own KV cache "
                                     "object; fxlens's generate keeps its own positions")
        return 0

    def get_residual(self, embed: torch.Tensor, pos_offset: int = 0, prepend_bos: bool | None = None,
                     attention_mask: torch.Tensor | None = None, tokens=None,
                     return_shortformer_pos_embed: bool = True, device=None):
        """embed [batch, pos, d_model] plus the learned position embedding of
        positions pos_offset.. (from `attention_mask` where given: counted over
        unmasked tokens, zero at pads, as TransformerLens); rotary and
        position-free models add nothing. Computed from W_pos: hooks do not run."""
        residual = embed
        if self.cfg.positional_embedding_type == "standard":
            w_pos = self.W_pos.to(embed)                                   # [n_ctx, d_model]
            seq = embed.shape[1]
            if attention_mask is None:
                residual = embed + w_pos[pos_offset:pos_offset + seq]
            else:
                mask = attention_mask.to(embed.device)
                positions = (mask.cumsum(-1) - 1).clamp_min(0)[:, pos_offset:pos_offset + seq]
                pos = w_pos[positions]                                    # [batch, pos, d_model]
                pos = pos.masked_fill(~mask[:, pos_offset:pos_offset + seq].bool()[..., None], 0.0)
                residual = embed + pos
        if device is not None:
            residual = residual.to(device)
        return (residual, None) if return_shortformer_pos_embed else residual

    # --- devices -----------------------------------------------------------------------
    def to(self, *args, print_details: bool = True, **kwargs):
        """nn.Module's `to` (TransformerLens's `print_details` is accepted; fxlens prints nothing)."""
        return super().to(*args, **kwargs)

    def cuda(self, device: int | str | torch.device | None = None):
        if not torch.cuda.is_available():
            raise FxlensError("cuda(): this machine has no CUDA device; keep the model on the CPU "
                              "(or load it with device=... on a machine that has one)")
        return self.to(f"cuda:{device}" if isinstance(device, int) else (device or "cuda"))

    def cpu(self):
        return self.to(torch.device("cpu"))

    def mps(self):
        if not torch.backends.mps.is_available():
            raise FxlensError("mps(): this machine has no MPS device; use cpu() or cuda()")
        return self.to(torch.device("mps"))

    def move_model_modules_to_device(self):
        """Everything onto `cfg.device` (fxlens places a model across devices with
        from_pretrained(..., device_map=...), not with cfg.n_devices)."""
        return self.to(self.cfg.device)

    # --- HookedRootModule's hook management --------------------------------------------
    def setup(self) -> None:
        """Re-read the graph's hook points into `hook_dict`."""
        self._refresh_hook_dict()

    def hook_points(self):
        return self.hook_dict.values()

    def clear_contexts(self) -> None:
        for hp in self.hook_dict.values():
            hp.clear_context()

    def remove_all_hook_fns(self, direction: str = "both", including_permanent: bool = False,
                            level: int | None = None) -> None:
        """Remove hook functions in `direction` ("fwd", "bwd", "both"); permanent ones
        only with `including_permanent`."""
        if direction not in ("fwd", "bwd", "both"):
            raise ValueError(f"direction={direction!r}; use 'fwd', 'bwd' or 'both'")
        if level is not None:
            raise NotApplicableError(
                "remove_all_hook_fns(level=...): fxlens's `hooks()` context removes exactly the hooks it "
                "added when it exits, so hooks have no levels; leave level=None")
        lists = {"fwd": ("fwd_hooks",), "bwd": ("bwd_hooks",), "both": ("fwd_hooks", "bwd_hooks")}[direction]
        for hp in self.hook_dict.values():
            for attr in lists:
                if hasattr(hp, attr):
                    setattr(hp, attr, [] if including_permanent else [h for h in getattr(hp, attr) if h[1]])

    def check_hooks_to_add(self, hook_point, hook_point_name: str, hook, dir: str = "fwd",
                           is_permanent: bool = False, prepend: bool = False) -> None:
        """Called before every hook is added (override it to add checks, as in
        TransformerLens). fxlens makes opt-in sites when they are named, so it only
        checks that the hook can be called."""
        if not callable(hook):
            raise TypeError(f"the hook for {hook_point_name} is a {type(hook).__name__}, not a function "
                            f"fn(activation, hook)")

    def check_and_add_hook(self, hook_point, hook_point_name: str, hook, dir: str = "fwd",
                           is_permanent: bool = False, level: int | None = None, prepend: bool = False) -> None:
        self.add_hook(hook_point_name, hook, dir=dir, is_permanent=is_permanent, prepend=prepend)

    def add_perma_hook(self, name, hook, dir: str = "fwd") -> None:
        """A hook that stays until reset_hooks(including_permanent=True)."""
        self.add_hook(name, hook, dir=dir, is_permanent=True)

    # --- caching hooks -----------------------------------------------------------------
    def get_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None, pos_slice=None):
        """(cache, fwd_hooks, bwd_hooks): hooks that fill `cache` (a new dict by
        default) with each named activation, detached and moved to `device`, the
        batch dim dropped with `remove_batch_dim`, `pos_slice` applied on the
        position dim (third from last for q/k/v/z/result); gradients go to
        "<name>_grad" keys. Use them with `with model.hooks(fwd_hooks, bwd_hooks):`."""
        cache = {} if cache is None else cache
        names = self._names(names_filter)
        self.is_caching = True

        def save(tensor, hook, is_backward=False):
            value = tensor.detach()
            if device is not None:
                value = value.to(device)
            if remove_batch_dim:
                value = value[0]
            cache[hook.name + ("_grad" if is_backward else "")] = slice_positions(hook.name, value, pos_slice)

        fwd = [(n, save) for n in names]
        bwd = [(n, functools.partial(save, is_backward=True)) for n in names] if incl_bwd else []
        return cache, fwd, bwd

    def add_caching_hooks(self, names_filter=None, incl_bwd: bool = False, device=None,
                          remove_batch_dim: bool = False, cache: dict | None = None) -> dict:
        """Adds the caching hooks of `get_caching_hooks` to the model (until
        reset_hooks) and returns the dict they fill on each run."""
        cache, fwd, bwd = self.get_caching_hooks(names_filter, incl_bwd, device, remove_batch_dim, cache)
        for direction, hooks in (("fwd", fwd), ("bwd", bwd)):
            for name, fn in hooks:
                self.add_hook(name, fn, dir=direction)
        return cache

    def cache_all(self, cache: dict, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False):
        warnings.warn("cache_all is deprecated in TransformerLens; use run_with_cache or add_caching_hooks",
                      DeprecationWarning, stacklevel=2)
        self.add_caching_hooks(None, incl_bwd, device, remove_batch_dim, cache)

    def cache_some(self, cache: dict, names, incl_bwd: bool = False, device=None, remove_batch_dim: bool = False):
        warnings.warn("cache_some is deprecated in TransformerLens; use run_with_cache or add_caching_hooks",
                      DeprecationWarning, stacklevel=2)
        self.add_caching_hooks(names, incl_bwd, device, remove_batch_dim, cache)

    # --- opt-in sites ------------------------------------------------------------------
    def _set_opt_in(self, flag: str, on: bool) -> None:
        """True: materialise the switch's sites in every block now (fxlens also makes
        one whenever it is named). False: only the flag; sites already made stay,
        and unedited they leave every number as it was."""
        if on:
            for layer in range(self.cfg.n_layers):
                lc = self.cfg.layers[layer] if layer < len(self.cfg.layers) else None
                if lc is not None and not (lc.has_mlp if flag == "use_hook_mlp_in" else lc.has_attn):
                    continue    # a hybrid's block without that sublayer (a mixer block, an MLP-only one)
                for short in _OPT_IN_SWITCHES[flag]:
                    self._hook_point(f"blocks.{layer}.{short}")
        setattr(self.cfg, flag, bool(on))

    def set_use_attn_result(self, use_attn_result: bool) -> None:
        """Per-head results, blocks.L.attn.hook_result [batch, pos, head, d_model]."""
        self._set_opt_in("use_attn_result", use_attn_result)

    def set_use_split_qkv_input(self, use_split_qkv_input: bool) -> None:
        """Per-head inputs to q, k and v: blocks.L.hook_q_input / k_input / v_input."""
        self._set_opt_in("use_split_qkv_input", use_split_qkv_input)

    def set_use_hook_mlp_in(self, use_hook_mlp_in: bool) -> None:
        """The MLP's input, blocks.L.hook_mlp_in."""
        if use_hook_mlp_in and self.cfg.d_mlp is None:
            raise FxlensError("set_use_hook_mlp_in: this model's blocks have no MLP")
        self._set_opt_in("use_hook_mlp_in", use_hook_mlp_in)

    def set_use_attn_in(self, use_attn_in: bool) -> None:
        """One per-head attention input, blocks.L.hook_attn_in (not with grouped kv heads)."""
        if use_attn_in and self.cfg.n_key_value_heads is not None:
            raise FxlensError(
                f"set_use_attn_in: this model groups its {self.cfg.n_heads} query heads over "
                f"{self.cfg.n_key_value_heads} kv heads, so q, k and v have no common per-head input; "
                f"use set_use_split_qkv_input(True) (hook_q_input / hook_k_input / hook_v_input)")
        self._set_opt_in("use_attn_in", use_attn_in)

    def set_ungroup_grouped_query_attention(self, ungroup_grouped_query_attention: bool) -> None:
        if ungroup_grouped_query_attention:
            raise NotApplicableError(
                "set_ungroup_grouped_query_attention(True): fxlens's hook_k / hook_v show the "
                "n_key_value_heads kv heads (TransformerLens's default); repeat them for each query "
                "head with k.repeat_interleave(n_heads // n_key_value_heads, dim=2)")

    # --- weight processing as methods --------------------------------------------------
    def process_weights_(self, fold_ln: bool = True, center_writing_weights: bool = True,
                         center_unembed: bool = True, refactor_factored_attn_matrices: bool = False,
                         fold_value_biases: bool = True) -> None:
        """TransformerLens's in-place weight processing (its load-time defaults,
        value biases folded too): reruns fxlens's processing passes on this model's
        graph, with its current weights. Leaves the model as
        `fxlens.from_pretrained(...)` with those flags would have built it."""
        self._reprocess(dict(fold_ln=fold_ln, center_writing_weights=center_writing_weights,
                             center_unembed=center_unembed, fold_value_biases=fold_value_biases,
                             refactor_factored_attn_matrices=refactor_factored_attn_matrices))

    def fold_layer_norm(self, state_dict=None, fold_biases: bool = True, center_weights: bool = True):
        """Fold each norm's weight (and bias) into the linears reading it, the
        norms becoming LNPre / RMSPre; `center_weights` also centres those readers
        (LayerNorm). On this model's graph: a TransformerLens state dict is refused."""
        self._no_state_dict("fold_layer_norm", state_dict)
        if not fold_biases and self.cfg.normalization_type == "LN":
            raise ProcessingError("fold_layer_norm(fold_biases=False): fxlens folds a LayerNorm's weight "
                                  "and bias together; use fold_biases=True")
        self._reprocess({"fold_ln": True}, center_ln=center_weights)

    def center_writing_weights(self, state_dict=None):
        """Subtract the mean over d_model from every weight writing to the residual stream."""
        self._no_state_dict("center_writing_weights", state_dict)
        self._reprocess({"center_writing_weights": True})

    def center_unembed(self, state_dict=None):
        """Subtract W_U's (and b_U's) mean over the vocabulary: logits move by a constant per position."""
        self._no_state_dict("center_unembed", state_dict)
        self._reprocess({"center_unembed": True})

    def fold_value_biases(self, state_dict=None):
        """Fold b_V into b_O (b_O += b_V @ W_O, b_V = 0)."""
        self._no_state_dict("fold_value_biases", state_dict)
        self._reprocess({"fold_value_biases": True})

    def refactor_factored_attn_matrices(self, state_dict=None):
        """Re-factor W_Q/W_K and W_V/W_O (same products, TransformerLens's SVD form)."""
        self._no_state_dict("refactor_factored_attn_matrices", state_dict)
        self._reprocess({"refactor_factored_attn_matrices": True})

    @staticmethod
    def _no_state_dict(name: str, state_dict) -> None:
        if state_dict is not None:
            raise NotApplicableError(
                f"{name}(state_dict): fxlens has no TransformerLens state dict; it rewrites this "
                f"model's own graph. Call model.{name}() with no state dict")

    def _reprocess(self, flags: dict, center_ln: bool = True) -> None:
        opt_in = [n for n in self.hook_dict if is_opt_in(n)]
        if opt_in:
            raise ProcessingError(
                f"weight processing after opt-in sites were made ({opt_in[0]}, ...): their rewrites "
                f"change the graph the passes match. Process first (or load with fxlens.from_pretrained), "
                f"then ask for the opt-in sites")
        flags = {k: v for k, v in flags.items() if v}
        if not flags:
            return
        probe = probe_tokens(self.cfg.d_vocab, self.cfg.n_ctx, device=self.cfg.device, batch=1)
        before = self._probe_log_probs(probe)
        log = self.processing if self.processing is not None else ProcessingLog()
        was, n_skipped = dict(log.applied), len(log.skipped)
        hooks = dict(self.hook_dict)
        results = reprocess(self.graph_module, self.spec, log, flags, center_ln=center_ln)
        for flag, applied in was.items():
            log.applied[flag] = bool(applied or log.applied.get(flag))
        self.processing = log
        for reason in log.skipped[n_skipped:]:
            warnings.warn(f"fxlens processing skipped: {reason}", stacklevel=3)
        self.pass_results += results
        # the same HookPoint objects come back (hooks already added stay on them)
        container = self.graph_module.get_submodule(CONTAINER)
        for attr, hp in list(container.named_children()):
            if hp.name in hooks:
                setattr(container, attr, hooks[hp.name])
        if log.get("fold_ln") and self.cfg.normalization_type in ("LN", "RMS"):
            self.cfg.normalization_type += "Pre"
        self._maps_cache = None
        self._length_graphs = {}
        if getattr(self, "_processing_flags", None) is not None:
            self._processing_flags.update(flags)     # per-length graphs are built with these
        self._graph_changed()
        check_on_probe(
            before, self._probe_log_probs(probe), REPROCESS_RTOL,
            failure=lambda err, scale: f"weight processing ({', '.join(flags)}) moved this model's log-probs by "
            f"{err:.3g} (largest {scale:.3g}); the model is left processed and should not be trusted. "
            f"Reload it, and please report the model")

    def _probe_log_probs(self, probe: torch.Tensor) -> torch.Tensor:
        """Log-probs of the eager graph on `probe`, with every hook set aside."""
        saved = {name: hp.fwd_hooks for name, hp in self.hook_dict.items()}
        try:
            for hp in self.hook_dict.values():
                hp.fwd_hooks = []
            with torch.no_grad():
                return self.graph_module(probe).float().log_softmax(-1)
        finally:
            for name, hp in self.hook_dict.items():
                hp.fwd_hooks = saved.get(name, [])

    # --- refused -----------------------------------------------------------------------
    init_weights = _refused(
        "init_weights", "fxlens instruments a trained HF checkpoint and has no initialiser of its own; "
        "initialise the HF model (model.init_weights()) and pass it to fxlens.from_pretrained")
    load_and_process_state_dict = _refused(
        "load_and_process_state_dict", "fxlens has no TransformerLens state dict; load an HF checkpoint "
        "with fxlens.from_pretrained, edit weights through the views (model.W_Q[...] = ...), "
        "and process with model.process_weights_()")
    fill_missing_keys = _refused(
        "fill_missing_keys", "fxlens has no TransformerLens state dict; every weight comes from the HF "
        "checkpoint")
    load_sample_training_dataset = _refused(
        "load_sample_training_dataset", "fxlens downloads no data sets; tokenize your own text "
        "(model.to_tokens) or read a local corpus (fxlens harvest --text FILE)")
    sample_datapoint = _refused(
        "sample_datapoint", "fxlens downloads no data sets; tokenize your own text (model.to_tokens)")
