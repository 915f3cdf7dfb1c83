"""ActivationCache: activations by hook name, in TransformerLens's key order."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .errors import UnknownHookError
from .names import act_name


class ActivationCache:
    def __init__(self, cache_dict: dict[str, torch.Tensor], model, has_batch_dim: bool = True):
        self.cache_dict = cache_dict
        self.model = model
        self.has_batch_dim = has_batch_dim

    def _key(self, key) -> str:
        if isinstance(key, tuple):
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

    def to(self, device) -> "ActivationCache":
        return ActivationCache({k: v.to(device) for k, v in self.cache_dict.items()},
                               self.model, self.has_batch_dim)

    def remove_batch_dim(self) -> "ActivationCache":
        if not self.has_batch_dim:
            return self
        for k, v in self.cache_dict.items():
            if v.shape[0] != 1:
                raise ValueError(f"remove_batch_dim: {k} has batch size {v.shape[0]}; it needs 1")
        return ActivationCache({k: v[0] for k, v in self.cache_dict.items()}, self.model, False)

    def __repr__(self) -> str:
        return f"ActivationCache with keys {list(self.cache_dict)}"
