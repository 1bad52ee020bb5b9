"""PageList: pages as pid + generation arrays, handles made on demand, views that never change under a reader."""

import numpy as np
import pytest

from kvstore.placement import PageList, PageTable
from kvstore.placement.pagelist import as_page_list
from kvstore.placement.table import pids_of


def _table(n: int = 8):
    table = PageTable(n)
    return table, table.new_pages(n, 0)


def test_new_pages_make_no_handle_until_one_is_asked_for():
    table, pids = _table()
    pages = PageList(table, pids)
    assert not table.handled[pids].any()
    first = pages[0]
    assert first.pid == pids[0] and table.handled[pids].tolist() == [True] + [False] * 7
    assert pages[0] is first and list(pages)[0] is first  # one handle per live page
    assert [p.pid for p in pages] == pids.tolist()


def test_pids_are_the_lists_own_read_only_array():
    table, pids = _table()
    pages = PageList(table, pids)
    assert pids_of(pages) is pages.pids
    with pytest.raises(ValueError):
        pages.pids[0] = 5


def test_a_freed_page_reads_freed_and_never_as_the_page_reusing_its_row():
    table = PageTable(4)
    pids = table.new_pages(4, 0)
    pages = PageList(table, pids)
    table.free_pages(pids[:2])
    reused = table.new_pages(4, 0)  # the never-used rows first, then the two freed rows
    assert set(pids[:2].tolist()) <= set(reused.tolist())
    assert pages.alive().tolist() == [False, False, True, True]
    assert [p.freed for p in pages] == [True, True, False, False]
    assert not table.page(int(pids[0])).freed  # the row's new page is another page
    assert pages[0] is not table.page(int(pids[0]))


def test_a_view_taken_before_the_list_changes_keeps_its_pages():
    table, pids = _table()
    pages = PageList(table, pids[:4])
    before = pages.pids
    pages.extend(PageList(table, pids[4:]))
    del pages[2:]
    pages.extend(PageList(table, pids[6:]))
    assert before.tolist() == pids[:4].tolist()
    assert pages.pids.tolist() == pids[:2].tolist() + pids[6:].tolist()


def test_slices_selections_and_sums_are_new_lists():
    table, pids = _table()
    pages = PageList(table, pids)
    part = pages[2:5]
    assert isinstance(part, PageList) and part.pids.tolist() == pids[2:5].tolist()
    part.extend(PageList(table, pids[:1]))
    assert pages.pids.tolist() == pids.tolist()
    picked = pages.select(pids % 2 == 0)
    assert picked.pids.tolist() == pids[pids % 2 == 0].tolist()
    assert (pages[:2] + pages[6:]).pids.tolist() == pids[:2].tolist() + pids[6:].tolist()
    assert as_page_list(table, pages) is pages
    assert as_page_list(table, list(pages)[:3]).pids.tolist() == pids[:3].tolist()


def test_only_the_tail_can_be_deleted():
    table, pids = _table()
    pages = PageList(table, pids)
    with pytest.raises(TypeError):
        del pages[1:3]
    del pages[5:]
    assert len(pages) == 5 and bool(pages)
    del pages[0:]
    assert len(pages) == 0 and not pages
    with pytest.raises(IndexError):
        pages[0]


def test_extending_with_handles_records_their_generation():
    table, pids = _table()
    handles = table.pages(pids[:3])
    pages = PageList(table)
    pages.extend(handles)
    assert pages.pids.tolist() == pids[:3].tolist()
    table.free_pages(np.array([pids[1]]))
    assert [p.freed for p in pages] == [False, True, False]
