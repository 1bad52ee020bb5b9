"""PageList: an ordered list of pages held as pid arrays, its handles made only when asked for.

A cache's pages, an operation's holds and new pages are PageLists, so whole-cache operations read
their pids with no Python per page (:func:`~kvstore.placement.table.pids_of` returns :attr:`PageList.pids`
as is) and a new page needs no handle until code that works page by page asks for it. Each entry also
records its row's generation (:attr:`PageTable.gen`), so a page freed since reads as a dead handle
(``freed``), never as the page that reuses its row — as a list of handles would.

The buffers are never written below the list's length once another list or array may share them:
:meth:`extend` writes past the end only, and truncating (``del pages[k:]``) copies. So :attr:`pids`,
a view, stays the list's pages at the time it was read, whatever happens to the list afterwards.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Sequence, Union, overload

import numpy as np

if TYPE_CHECKING:
    from .page import Page
    from .table import PageTable

_EMPTY = np.zeros(0, dtype=np.int64)


class PageList(Sequence["Page"]):
    """Pages of one table, in order. Iterating or indexing gives handles (made on demand); slicing gives a
    new PageList; :attr:`pids` is the pid array."""

    __slots__ = ("_t", "_buf", "_gen", "_n", "_view")

    def __init__(self, table: "PageTable", pids: np.ndarray = _EMPTY, gens: Optional[np.ndarray] = None) -> None:
        """``pids`` of live pages (``gens``: their generations when known, else read from the table)."""
        self._t = table
        self._buf = pids
        self._gen = table.gen[pids] if gens is None else gens
        self._n = int(pids.size)
        self._view: Optional[np.ndarray] = None

    @property
    def pids(self) -> np.ndarray:
        """The pids, in order (a read-only view: copy it to change it)."""
        view = self._view
        if view is None:
            view = self._view = self._buf[: self._n]
            view.flags.writeable = False
        return view

    def alive(self) -> np.ndarray:
        """Mask of the pages not freed since they were listed."""
        mask: np.ndarray = self._t.gen[self._buf[: self._n]] == self._gen[: self._n]
        return mask

    def __len__(self) -> int:
        return self._n

    def __bool__(self) -> bool:
        return self._n > 0

    @overload
    def __getitem__(self, i: int) -> "Page": ...

    @overload
    def __getitem__(self, i: slice) -> "PageList": ...

    def __getitem__(self, i: Union[int, slice]) -> Union["Page", "PageList"]:
        n = self._n
        if isinstance(i, slice):
            return PageList(self._t, self._buf[:n][i].copy(), self._gen[:n][i].copy())
        if not -n <= i < n:
            raise IndexError(f"page {i} of a list of {n}")
        j = i % n
        return self._t.pages_at(self._buf[j : j + 1], self._gen[j : j + 1])[0]

    def __iter__(self) -> Iterator["Page"]:
        return iter(self._t.pages_at(self._buf[: self._n], self._gen[: self._n]))

    def __repr__(self) -> str:
        return f"<PageList of {self._n}>"

    def __add__(self, other: "PageList") -> "PageList":
        if not isinstance(other, PageList):
            return NotImplemented
        out = self.copy()
        out.extend(other)
        return out

    def copy(self) -> "PageList":
        return PageList(self._t, self._buf[: self._n].copy(), self._gen[: self._n].copy())

    def select(self, mask: np.ndarray) -> "PageList":
        """The pages where ``mask`` (one bool per page) is true, in order."""
        return PageList(self._t, self._buf[: self._n][mask], self._gen[: self._n][mask])

    def extend(self, pages: Union["PageList", Iterable["Page"]]) -> None:
        """Append ``pages`` (a PageList, or live handles) at the end."""
        if isinstance(pages, PageList):
            add, gens = pages._buf[: pages._n], pages._gen[: pages._n]
        else:
            from .table import pids_of

            add = pids_of(pages)
            gens = self._t.gen[add]
        k = int(add.size)
        if not k:
            return
        n, need = self._n, self._n + k
        if need > self._buf.size or self._buf.base is not None or self._gen.base is not None:
            size = max(need, 2 * n, 16)
            buf, gen = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.int64)
            buf[:n], gen[:n] = self._buf[:n], self._gen[:n]
            self._buf, self._gen = buf, gen
        self._buf[n:need] = add
        self._gen[n:need] = gens
        self._n = need
        self._view = None

    def __delitem__(self, i: slice) -> None:
        """``del pages[k:]`` (the only deletion a cache makes: a shrink)."""
        if not isinstance(i, slice) or i.step not in (None, 1) or i.stop is not None:
            raise TypeError("a PageList only deletes its tail: del pages[k:]")
        keep = range(self._n)[i].start
        self._buf, self._gen = self._buf[:keep].copy(), self._gen[:keep].copy()
        self._n = keep
        self._view = None


def as_page_list(table: "PageTable", pages: Union[PageList, Sequence["Page"]]) -> PageList:
    """``pages`` (live handles) as a PageList of ``table``; a PageList is returned as is."""
    if isinstance(pages, PageList):
        return pages
    from .table import pids_of

    return PageList(table, pids_of(pages))
