"""Prefix index: a radix tree of committed pages keyed by a chained SHA-256 over the token prefix.

Key of page i = sha256(key of page i-1 || bytes of its tokens); page 0 chains from a seed that mixes
the store namespace and the page layout, so two models or layouts never share pages. A page's bytes
are its token ids as little-endian int32 when every id of the page fits (tag ``4``), else int64 (tag
``8``): canonical per page, half the bytes to hash for real vocabularies. Hashing runs in C, one
``hashlib`` call per page over a slice of one buffer.

The tree has one node per indexed page: its parent is the node of the previous page of the prefix,
its children the indexed pages that extend it by one page. Matching walks from the root one child
per page (cost proportional to the pages of the query, not to the pages cached). A node whose parent
key is not indexed (its parent was dropped, or another page owns that key) waits detached and is
re-attached when a page is indexed under that key. A node also counts reuse ``hits`` and carries the
``hot`` flag the frequency-aware eviction policy uses; a bounded *ghost* of recently dropped keys
makes a page committed again soon after its drop start with one hit.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from ..errors import InvalidArgumentError
from .page import Page

_I32_MIN, _I32_MAX = -(2**31), 2**31 - 1


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
            b"kvstore-prefix-v2\0" + namespace.encode() + b"\0" + layout_fingerprint.encode()
        ).digest()

    def page_bytes(self, tokens: np.ndarray, start: int, stop: int) -> list[bytes]:
        """The canonical bytes (tag + ids) of full pages ``start..stop-1`` of ``tokens``."""
        tpp = self.tokens_per_page
        block = np.ascontiguousarray(tokens[start * tpp : stop * tpp], dtype=np.int64)
        n = stop - start
        if n <= 0:
            return []
        if block.min() >= _I32_MIN and block.max() <= _I32_MAX:
            buf = block.astype("<i4").tobytes()
            step = tpp * 4
            return [b"\x04" + buf[i * step : (i + 1) * step] for i in range(n)]
        pages = block.reshape(n, tpp)
        fits = (pages.min(axis=1) >= _I32_MIN) & (pages.max(axis=1) <= _I32_MAX)
        return [
            (b"\x04" + pages[i].astype("<i4").tobytes()) if fits[i] else (b"\x08" + pages[i].astype("<i8").tobytes())
            for i in range(n)
        ]

    def chain(self, prev: Optional[bytes], data: bytes) -> bytes:
        """Key of a page with canonical bytes ``data`` after the page keyed ``prev`` (None: first page)."""
        return hashlib.sha256((self.seed if prev is None else prev) + data).digest()

    def keys(self, tokens: np.ndarray, start: int, stop: int, prev: Optional[bytes]) -> list[bytes]:
        """Keys of full pages ``start..stop-1``; ``prev`` is the key of page ``start-1`` (None for page 0)."""
        out = []
        h = self.seed if prev is None else prev
        sha = hashlib.sha256
        for data in self.page_bytes(tokens, start, stop):
            h = sha(h + data).digest()
            out.append(h)
        return out


class _Node:
    """One indexed page in the tree."""

    __slots__ = ("page", "key", "parent_key", "parent", "children", "hits", "hot")

    def __init__(self, page: Page, key: bytes, parent_key: Optional[bytes]) -> None:
        self.page = page
        self.key = key
        self.parent_key = parent_key  # None: a first page (child of the root)
        self.parent: Optional[_Node] = None  # None with a parent_key: detached
        self.children: dict[bytes, _Node] = {}
        self.hits = 0  # times reused through create_cache()
        self.hot = False  # in the protected segment of the frequency-aware policy


class PrefixIndex:
    """Radix tree of committed pages over their chained keys."""

    def __init__(self, ghost_capacity: int = 0) -> None:
        self._nodes: dict[bytes, _Node] = {}
        self._roots: dict[bytes, _Node] = {}
        self._detached: dict[bytes, dict[bytes, _Node]] = {}  # missing parent key -> waiting nodes
        self._ghost: OrderedDict[bytes, None] = OrderedDict()
        self.ghost_capacity = ghost_capacity
        self.on_remove: Optional[Callable[[_Node], None]] = None  # called with each node that leaves

    def __len__(self) -> int:
        return len(self._nodes)

    def get(self, key: bytes) -> Optional[Page]:
        node = self._nodes.get(key)
        return None if node is None else node.page

    def node(self, page: Page) -> Optional[_Node]:
        """The node of an indexed page (None when ``page`` is not the indexed page of its key)."""
        if not page.indexed or page.key is None:  # an indexed page always has its key
            return None
        node = self._nodes.get(page.key)
        return node if node is not None and node.page is page else None

    def add(self, page: Page, parent_key: Optional[bytes] = None) -> bool:
        """Register ``page`` under ``page.key`` as a child of ``parent_key``; False (no change) if the key is taken."""
        key = page.key
        if key is None or key in self._nodes:
            return False
        node = _Node(page, key, parent_key)
        self._nodes[key] = node
        page.indexed = True
        if parent_key is None:
            self._roots[key] = node
        else:
            parent = self._nodes.get(parent_key)
            if parent is None:
                self._detached.setdefault(parent_key, {})[key] = node
            else:
                node.parent = parent
                parent.children[key] = node
        waiting = self._detached.pop(key, None)
        if waiting:
            for child in waiting.values():
                child.parent = node
            node.children.update(waiting)
        if self._ghost.pop(key, 0) is None:  # committed again soon after it was dropped: a reuse
            node.hits = 1
        return True

    def remove(self, page: Page) -> None:
        """Unregister ``page``: its children wait detached; its key joins the ghost of dropped keys."""
        if not page.indexed or page.key is None:
            return
        node = self._nodes.get(page.key)
        page.indexed = False
        if node is None or node.page is not page:
            return
        key = node.key
        del self._nodes[key]
        if self.on_remove is not None:
            self.on_remove(node)
        if node.parent_key is None:
            del self._roots[key]
        elif node.parent is not None:
            del node.parent.children[key]
        else:
            waiting = self._detached[node.parent_key]
            del waiting[key]
            if not waiting:
                del self._detached[node.parent_key]
        if node.children:
            for child in node.children.values():
                child.parent = None
            self._detached[key] = node.children
        if self.ghost_capacity > 0:
            self._ghost[key] = None
            if len(self._ghost) > self.ghost_capacity:
                self._ghost.popitem(last=False)

    def match(self, keys: Sequence[bytes]) -> list[Page]:
        """Pages of the longest indexed prefix of ``keys`` (chained keys: a key names its whole prefix)."""
        out = []
        nodes = self._nodes
        for k in keys:
            node = nodes.get(k)
            if node is None:
                break
            out.append(node.page)
        return out

    def match_tokens(self, hasher: PrefixHasher, tokens: np.ndarray) -> tuple[list[Page], Optional[bytes]]:
        """Pages of the longest indexed prefix of ``tokens`` and the key of the last one.

        Hashes page by page and stops at the first miss, so a miss early costs one hash.
        """
        n = len(tokens) // hasher.tokens_per_page
        out: list[Page] = []
        if n == 0 or not self._roots:
            return out, None
        children = self._roots
        key: Optional[bytes] = None
        chunk = 1  # canonical bytes are made in growing chunks: cheap misses, few numpy calls on hits
        i = 0
        while i < n:
            stop = min(n, i + chunk)
            for data in hasher.page_bytes(tokens, i, stop):
                k = hasher.chain(key, data)
                node = children.get(k)
                if node is None:
                    return out, key
                out.append(node.page)
                key, children = k, node.children
            i = stop
            chunk *= 4
        return out, key

    def children_of(self, page: Page) -> Iterator[Page]:
        """Indexed pages that extend ``page`` by one page."""
        node = self.node(page)
        if node is not None and node.children:
            for child in node.children.values():
                yield child.page

    def record_hit(self, page: Page) -> Optional[_Node]:
        """Count a reuse of ``page``; its node (None if it is not indexed)."""
        node = self.node(page)
        if node is not None:
            node.hits += 1
        return node

    def pages(self) -> list[Page]:
        return [n.page for n in self._nodes.values()]

    def check(self) -> None:
        """Raise AssertionError naming the first broken link of the tree."""
        for key, node in self._nodes.items():
            page = node.page
            if node.key != key or page.key != key or not page.indexed:
                raise AssertionError(f"prefix node of page {page.pid} disagrees with its key")
            if node.parent_key is None:
                if self._roots.get(key) is not node:
                    raise AssertionError(f"first page {page.pid} is not a root of the prefix tree")
            else:
                parent = self._nodes.get(node.parent_key)
                if parent is not node.parent:
                    raise AssertionError(f"page {page.pid} is linked to the wrong parent in the prefix tree")
                holder = parent.children if parent is not None else self._detached.get(node.parent_key, {})
                if holder.get(key) is not node:
                    raise AssertionError(f"page {page.pid} is missing from its parent's children")
            for ck, child in node.children.items():
                if child.parent is not node or child.parent_key != key or self._nodes.get(ck) is not child:
                    raise AssertionError(f"child page {child.page.pid} of page {page.pid} is not linked back")
        if len(self._roots) + sum(len(n.children) for n in self._nodes.values()) + sum(
            len(w) for w in self._detached.values()
        ) != len(self._nodes):
            raise AssertionError("prefix tree links do not account for every indexed page exactly once")
        for parent_key in self._detached:
            if parent_key in self._nodes:
                raise AssertionError("a detached page waits for a parent that is indexed")
