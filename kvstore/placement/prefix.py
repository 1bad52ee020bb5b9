"""Prefix index: committed pages keyed by a chained SHA-256 over the token prefix.

Key of page i = sha256(key of page i-1 || int64 bytes of its tokens); page 0 chains from a seed that
mixes the store namespace and the page layout, so two models or layouts never share pages.
"""

from __future__ import annotations

import hashlib
from typing import Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .page import Page


def as_token_array(tokens: object) -> np.ndarray:
    """``tokens`` (a sequence of ints, a numpy array or a torch tensor) as a 1-D int64 array."""
    if hasattr(tokens, "detach") and hasattr(tokens, "cpu"):
        tokens = tokens.detach().cpu().numpy()  # a torch tensor
    if isinstance(tokens, (str, bytes)):
        raise InvalidArgumentError("tokens must be a sequence of int token ids, not a string")
    try:
        arr = np.asarray(tokens)
    except (TypeError, ValueError) as exc:
        raise InvalidArgumentError(f"tokens must be a sequence of int token ids: {exc}") from None
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise InvalidArgumentError(
            f"tokens must be a flat sequence of int token ids, got an array of shape {arr.shape} and dtype {arr.dtype}"
        )
    return arr.astype(np.int64, copy=False)


class PrefixHasher:
    """Computes chained page keys for token sequences."""

    def __init__(self, namespace: str, layout_fingerprint: str, tokens_per_page: int) -> None:
        self.tokens_per_page = tokens_per_page
        self.seed = hashlib.sha256(
            b"kvstore-prefix-v1\0" + namespace.encode() + b"\0" + layout_fingerprint.encode()
        ).digest()

    def keys(self, tokens: np.ndarray, start: int, stop: int, prev: Optional[bytes]) -> list[bytes]:
        """Keys of full pages ``start..stop-1``; ``prev`` is the key of page ``start-1`` (None for page 0)."""
        tpp = self.tokens_per_page
        buf = np.ascontiguousarray(tokens[start * tpp : stop * tpp]).tobytes()
        step = tpp * 8
        out = []
        h = self.seed if prev is None else prev
        for i in range(stop - start):
            h = hashlib.sha256(h + buf[i * step : (i + 1) * step]).digest()
            out.append(h)
        return out


class PrefixIndex:
    """Map from page key to the committed page holding it."""

    def __init__(self) -> None:
        self._pages: dict[bytes, Page] = {}

    def __len__(self) -> int:
        return len(self._pages)

    def get(self, key: bytes) -> Optional[Page]:
        return self._pages.get(key)

    def add(self, page: Page) -> bool:
        """Register ``page`` under its key; False (and nothing changes) if the key is taken."""
        if page.key is None or page.key in self._pages:
            return False
        self._pages[page.key] = page
        page.indexed = True
        return True

    def remove(self, page: Page) -> None:
        if page.indexed and page.key is not None:
            del self._pages[page.key]
            page.indexed = False

    def match(self, keys: Sequence[bytes]) -> list[Page]:
        """Pages of the longest indexed prefix of ``keys``."""
        out = []
        for k in keys:
            page = self._pages.get(k)
            if page is None:
                break
            out.append(page)
        return out

    def pages(self):
        return self._pages.values()
