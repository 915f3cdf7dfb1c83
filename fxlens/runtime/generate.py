"""Sampling from a HookedModel: TransformerLens's `generate`, with hooks active.

With `use_past_kv_cache=True` (the default, as TransformerLens) the prompt runs
once through the prefill graph of `fxlens.runtime.kv_cache` (hooks see
`[batch, prompt_len, ...]`), which also returns every layer's keys and values;
then each step runs the decode graph on the new token against them (hooks see
`[batch, 1, ...]`, the pattern `[batch, head, 1, pos_so_far]`). A compiled model
cuts the two graphs into segments at block boundaries and compiles each
distinct segment once (batch, prompt and cache lengths dynamic; hooks run in
Python between segments).
A model whose graphs fail their load check (a sliding window shorter than the
probe) falls back, with one warning, to the path `use_past_kv_cache=False`
always takes: `self.forward` on the whole sequence so far each step (a compiled
model reuses one compiled graph, its sequence length being dynamic), hooks
seeing `[batch, pos_so_far, ...]`. Prompts of different lengths (a list of
texts, or token rows with an `attention_mask`) run as one left-padded batch
with its mask where the model masks left padding exactly
(`HookedModel.padding_support("left")`: positions from the mask); elsewhere
rows of equal length run together, each group on its own. Either way each row
is exactly its own generation, and the results are assembled into one padded
answer.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch

from fxlens.errors import ContextLengthError, FxlensError
from fxlens.runtime import kv_cache

RETURN_TYPES = ("input", "str", "tokens", "embeds")


class KVCacheWarning(UserWarning):
    """`use_past_kv_cache=True` was asked for and this model's decode graph is not
    available; fxlens recomputes the prefix instead."""


def sample_logits(final_logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None,
                  temperature: float = 1.0, freq_penalty: float = 0.0,
                  tokens: torch.Tensor | None = None, mask: torch.Tensor | None = None) -> torch.Tensor:
    """[batch, d_vocab] logits -> [batch] sampled token ids, as TransformerLens's
    `utils.sample_logits`: temperature 0 is argmax; otherwise logits / temperature,
    minus `freq_penalty` x (how often each id occurs in `tokens` [batch, pos]),
    then `top_k` (keep the k largest) or else `top_p` (keep the smallest set of
    most likely tokens whose mass reaches top_p), then one categorical draw.
    `mask` [batch, pos] (0 at padding): pad tokens are not counted."""
    if temperature == 0.0:
        return final_logits.argmax(dim=-1)
    logits = final_logits.float() / temperature                          # [batch, d_vocab]
    if freq_penalty:
        if tokens is None:
            raise ValueError("freq_penalty needs the tokens generated so far (tokens=...)")
        tokens = tokens.to(logits.device)
        seen = torch.ones_like(tokens, dtype=logits.dtype) if mask is None else mask.to(logits)
        counts = torch.zeros_like(logits).scatter_add_(-1, tokens, seen)  # [batch, d_vocab] occurrences
        logits = logits - freq_penalty * counts
    if top_k is not None:
        if top_k <= 0:
            raise ValueError(f"top_k={top_k}; it must be a positive number of tokens")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]   # [batch, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    elif top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p={top_p}; it must lie in (0, 1]")
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        mass = sorted_logits.softmax(dim=-1).cumsum(dim=-1)                # mass up to and including i
        # drop the i-th most likely token once the tokens before it already exceed top_p
        drop_sorted = torch.zeros_like(mass, dtype=torch.bool)
        drop_sorted[..., 1:] = mass[..., :-1] > top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)                 # back to vocab order
        logits = logits.masked_fill(drop, float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), num_samples=1)[:, 0]


class GenerateMixin:
    """`generate` for HookedModel (needs `forward`, `to_tokens`, `hooks`, `tokenizer`, `cfg`)."""

    @torch.no_grad()
    def generate(self, input="", max_new_tokens: int = 10, stop_at_eos: bool = True,
                 eos_token_id: int | Sequence[int] | None = None, do_sample: bool = True,
                 top_k: int | None = None, top_p: float | None = None, temperature: float = 1.0,
                 freq_penalty: float = 0.0, use_past_kv_cache: bool = True,
                 prepend_bos: bool | None = None, padding_side: str | None = None,
                 return_type: str | None = "input", verbose: bool = True, *, fwd_hooks=(),
                 attention_mask: torch.Tensor | None = None):
        """Sample up to `max_new_tokens` tokens, TransformerLens's `generate`.

        `input`: a string, a list of strings, or token ids [batch, pos] (or [pos]).
        Returns the prompt plus the new tokens: text for text input and tokens for
        token input (`return_type="input"`), or `"str"` / `"tokens"` explicitly. A
        batch of one decodes to a single string.

        Sampling: `do_sample=False` is greedy; otherwise `temperature`,
        `freq_penalty`, then `top_k` or (if no top_k) `top_p`, as TransformerLens's
        `sample_logits`. With `stop_at_eos`, a row stops at `eos_token_id` (an id
        or a list of ids; default the tokenizer's eos) and is padded with the eos
        token while other rows go on; generation ends when every row has stopped.

        Hooks already on the model (`with model.hooks(...)`, `add_hook`) and those
        given as `fwd_hooks=[(name, fn)]` (for this call only) fire at every step:
        on the prompt, then on each new token (KV cache), or on the whole
        sequence so far (recomputing). `verbose` shows a tqdm progress bar.

        `use_past_kv_cache=True` runs the prompt once (prefill), then decodes
        with cached keys and values (module docstring); False, or a model whose
        decode graph fails its check, recomputes the prefix each step.
        Differences from TransformerLens:
        - a list of prompts of different lengths runs as one left-padded,
          masked batch (positions from the mask), or, where the model cannot
          mask padding exactly, in groups of equal length; each row's
          continuation is exactly what it would be alone. Tokens returned for such a list are padded on
          `padding_side`: left gives `[pad.., prompt, new]` (as TransformerLens),
          right gives `[prompt, new, pad..]`. A token tensor is used as given
          (every row is a whole prompt), or with `attention_mask` [batch, pos]
          each row's unmasked tokens are its prompt (padding on either side).
        - embeddings in or out (`return_type="embeds"`) are not supported.
        """
        if return_type not in RETURN_TYPES:
            raise ValueError(f"return_type={return_type!r}; use one of {list(RETURN_TYPES)}")
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens}; it must be >= 0")
        decoder = self._kv_decoder() if use_past_kv_cache else None
        rows, input_type, squeeze = self._generation_rows(input, prepend_bos, attention_mask)
        if return_type == "input":
            return_type = "str" if input_type == "str" else "tokens"
        if return_type == "embeds":
            raise FxlensError("generate: return_type='embeds' is not supported; fxlens graphs take "
                              "token ids. Use return_type='tokens' and run_with_cache for hook_embed.")
        stop_tokens, eos_pad = self._stop_tokens(stop_at_eos, eos_token_id)
        longest = max(r.shape[-1] for r in rows)
        if longest + max_new_tokens > self.cfg.n_ctx:
            raise ContextLengthError(
                f"generate: a {longest}-token prompt plus max_new_tokens={max_new_tokens} exceeds the "
                f"model's context n_ctx={self.cfg.n_ctx}; shorten the prompt or ask for fewer tokens.")

        # one left-padded batch where the model masks padding exactly; else rows of equal length
        # run as one batch each (never a padded row that would not equal its own run)
        groups: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            groups.setdefault(r.shape[-1], []).append(i)
        if len(groups) > 1 and self.padding_support("left") == "":
            groups = {longest: list(range(len(rows)))}
        sampling = dict(do_sample=do_sample, top_k=top_k, top_p=top_p, temperature=temperature,
                        freq_penalty=freq_penalty)
        from tqdm.auto import tqdm

        new: list[torch.Tensor | None] = [None] * len(rows)                # each [n_steps]
        with tqdm(total=max_new_tokens * len(groups), disable=not verbose) as bar, \
                self.hooks(fwd_hooks=fwd_hooks):
            for idx in groups.values():
                prompt, mask = self._left_padded([rows[i] for i in idx])   # [group, pos] each
                out = self._generate_group(prompt, mask, max_new_tokens, stop_tokens, eos_pad, sampling, bar,
                                           decoder)
                for j, i in enumerate(idx):
                    new[i] = out[j]

        # a group whose rows all stopped early is padded with eos to the longest
        n_new = max(t.shape[-1] for t in new)
        new = [torch.cat([t, t.new_full((n_new - t.shape[-1],), eos_pad)]) for t in new]
        if return_type == "str":
            tok = self._need_tokenizer()
            texts = [tok.decode(torch.cat([r[0], t]), skip_special_tokens=True) for r, t in zip(rows, new)]
            return texts[0] if len(texts) == 1 else texts
        tokens = self._assemble(rows, new, padding_side)
        return tokens[0] if squeeze else tokens

    # --- helpers --------------------------------------------------------------------
    def _generation_rows(self, input, prepend_bos, attention_mask=None) -> tuple[list[torch.Tensor], str, bool]:
        """The prompts as a list of [1, pos_i] id tensors (text is tokenized row by
        row, and a token tensor's padding is dropped by `attention_mask`, so no
        row carries padding), the input's kind, and whether the input was one
        1-D token sequence."""
        if attention_mask is not None and not isinstance(input, torch.Tensor):
            raise ValueError("generate: attention_mask goes with token ids; texts are tokenized "
                             "row by row and carry no padding")
        if isinstance(input, str):
            return [self.to_tokens(input, prepend_bos=prepend_bos)], "str", False
        if isinstance(input, (list, tuple)) and input and all(isinstance(s, str) for s in input):
            return [self.to_tokens(s, prepend_bos=prepend_bos) for s in input], "str", False
        if isinstance(input, torch.Tensor):
            if input.is_floating_point():
                raise FxlensError("generate: embeddings as input are not supported; fxlens graphs take "
                                  "token ids [batch, pos]")
            if input.dim() not in (1, 2) or input.shape[-1] == 0:
                raise ValueError(f"generate: token ids must be [batch, pos] or [pos], got shape "
                                 f"{tuple(input.shape)}")
            tokens = input.unsqueeze(0) if input.dim() == 1 else input
            tokens = tokens.to(self.cfg.device, torch.long)
            if attention_mask is None:
                return list(tokens.split(1)), "tokens", input.dim() == 1
            mask = torch.as_tensor(attention_mask, device=tokens.device)
            mask = mask.unsqueeze(0) if mask.dim() == 1 else mask
            if mask.shape != tokens.shape:
                raise ValueError(f"generate: attention_mask has shape {tuple(mask.shape)}; the tokens "
                                 f"are {tuple(tokens.shape)}")
            rows = [t[m != 0][None] for t, m in zip(tokens, mask)]
            if any(r.shape[-1] == 0 for r in rows):
                raise ValueError("generate: a row of attention_mask masks every token; each prompt "
                                 "needs at least one")
            return rows, "tokens", input.dim() == 1
        raise TypeError(f"generate: input must be a string, a list of strings or token ids, not "
                        f"{type(input).__name__}")

    def _stop_tokens(self, stop_at_eos: bool, eos_token_id) -> tuple[list[int], int]:
        """(ids that stop a row, the id that pads a stopped row)."""
        tok_eos = getattr(self.tokenizer, "eos_token_id", None)
        if not stop_at_eos:
            return [], tok_eos if tok_eos is not None else 0
        if eos_token_id is None:
            eos_token_id = tok_eos
            if eos_token_id is None:
                eos_token_id = getattr(getattr(self, "hf_config", None), "eos_token_id", None)
            if eos_token_id is None:
                raise FxlensError("generate: stop_at_eos needs an end-of-sequence id and the model's "
                                  "tokenizer has none; pass eos_token_id=... or stop_at_eos=False")
        if isinstance(eos_token_id, int):
            return [eos_token_id], eos_token_id
        stop = [int(t) for t in eos_token_id]
        if not stop:
            raise ValueError("generate: eos_token_id is an empty list")
        return stop, tok_eos if tok_eos is not None else stop[0]

    def _kv_decoder(self):
        """The model's decode graph, built and checked once per graph version; None
        (with one warning saying why) when this model cannot use it."""
        key = getattr(self, "_graph_version", 0)
        cached = getattr(self, "_decoder_cache", None)
        if cached is None or cached[0] != key:
            decoder, why = kv_cache.build_decoder(self)
            if decoder is None:
                warnings.warn(f"generate: no KV cache for this model ({why}); recomputing the prefix "
                              f"at each step instead", KVCacheWarning, stacklevel=4)
            self._decoder_cache = cached = (key, decoder)
        return cached[1]

    def _left_padded(self, rows: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[1, pos_i] prompts -> ([batch, pos] ids left-padded, mask [batch, pos]; None
        where all have one length)."""
        width = max(r.shape[-1] for r in rows)
        if all(r.shape[-1] == width for r in rows):
            return torch.cat(rows), None
        pad = self._pad_id()
        ids = torch.cat([torch.cat([r.new_full((1, width - r.shape[-1]), pad), r], 1) for r in rows])
        mask = torch.cat([torch.cat([r.new_zeros((1, width - r.shape[-1])), torch.ones_like(r)], 1)
                          for r in rows])
        return ids, mask

    def _generate_group(self, tokens: torch.Tensor, mask: torch.Tensor | None, max_new_tokens: int,
                        stop_tokens: list[int], eos_pad: int, sampling: dict, bar, decoder=None) -> torch.Tensor:
        """Generate for one batch of prompts, [batch, pos] (left-padded where `mask`
        [batch, pos] is given) -> new ids [batch, n_steps]."""
        batch, prompt_len = tokens.shape
        finished = torch.zeros(batch, dtype=torch.bool, device=tokens.device)
        stop = torch.tensor(stop_tokens, dtype=torch.long, device=tokens.device)
        if decoder is not None:
            # the prompt in one pass (hooks see [batch, pos, ...]); then one token per step
            logits, past = decoder.prefill(tokens, mask)
        for step in range(max_new_tokens):
            if decoder is None:
                final_logits = self.forward(tokens, attention_mask=mask)[:, -1, :]   # [batch, d_vocab]
            else:
                if step:
                    logits, past = decoder.step(tokens, mask, past)
                final_logits = logits[:, -1, :]          # left padding: every row's last token
            if sampling["do_sample"]:
                nxt = sample_logits(final_logits, sampling["top_k"], sampling["top_p"],
                                    sampling["temperature"], sampling["freq_penalty"], tokens=tokens,
                                    mask=mask)
            else:
                nxt = final_logits.argmax(dim=-1)                           # [batch]
            nxt = nxt.to(tokens.device)
            if stop_tokens:
                # a stopped row keeps its answer: it is padded with eos from then on
                nxt = nxt.masked_fill(finished, eos_pad)
                finished |= torch.isin(nxt, stop)
            tokens = torch.cat([tokens, nxt[:, None]], dim=1)
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones((batch, 1))], dim=1)
            bar.update(1)
            if stop_tokens and bool(finished.all()):
                bar.update(max_new_tokens - step - 1)
                break
        return tokens[:, prompt_len:]

    def _pad_id(self) -> int:
        tok = self.tokenizer
        if tok is None:
            return 0
        return tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)

    def _assemble(self, rows: list[torch.Tensor], new: list[torch.Tensor], padding_side) -> torch.Tensor:
        """[batch, max_len] ids: each row's prompt and new tokens, padded on `padding_side`."""
        full = [torch.cat([r[0], t]) for r, t in zip(rows, new)]
        width = max(f.shape[-1] for f in full)
        if all(f.shape[-1] == width for f in full):
            return torch.stack(full)
        side = padding_side or getattr(self.tokenizer, "padding_side", None) or "right"
        pad = self._pad_id()
        out = []
        for f in full:
            fill = f.new_full((width - f.shape[-1],), pad)
            out.append(torch.cat([fill, f]) if side == "left" else torch.cat([f, fill]))
        return torch.stack(out)
