"""Random map / unmap / overlay / write sequences on a small Anon, checked against the kernel.

The machine keeps a plain model of the address space this Anon owns: for each page of it,
which Anon page it shows (or which page of a scratch file an overlay shows there), and for
each Anon page the bytes last written to it. After every step:

- the count devanon reports for each page equals how many VMAs in ``/proc/self/maps`` show
  it, and the model's count;
- every Anon page reads, through ``os.pread``, the bytes last written to it, or zeros if it
  was never written or its count fell to zero since (punched);
- ``SEEK_DATA`` finds exactly the written pages that still have a count, and ``st_blocks``
  is exactly that many pages;
- through the mappings, written pages show their bytes and overlays show the file's bytes
  (or what was written through a writable overlay, which never reaches the file).

Pages never written are only read with ``pread``: a read fault on a shmem hole through a
mapping would allocate a page and change what the kernel reports.

Views (``Mapping.view()``) are either made for one write and released at once, or kept
across steps (``keep_view``, at most two): while one lives, its mapping cannot be mapped
over (BufferError), and the pieces of it that are unmapped are quarantined, so the stale
view reads zeros there and its writes reach neither the Anon nor anything else
(DESIGN invariant 5). A read-only overlay is refused under a live writable view, and a view
made while a read-only overlay lies on its mapping is read-only (a write there would fault).
"""

from __future__ import annotations

import collections
import ctypes
import os
import sys
import tempfile
from dataclasses import dataclass

import oracle
import pytest
from hypothesis import event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

import devanon

PS = devanon.PAGE_SIZE
NPAGES = 32
FILE_PAGES = 40
ZEROS = bytes(PS)

pytestmark = pytest.mark.skipif(
    not oracle.shmem_small_folios(),
    reason="shmem may allocate large folios on this host (THP shmem_enabled): st_blocks and "
    "SEEK_DATA would count whole folios, not the pages written",
)


def pattern(tag: str, *numbers: int) -> bytes:
    """A page of bytes that no other (tag, numbers) gives; never all zeros."""
    stamp = (tag + "".join(f" {n}" for n in numbers) + "|").encode()
    return (stamp * (PS // len(stamp) + 1))[:PS]


@dataclass
class Slot:
    """One page of address space the Anon owns, as the model sees it."""

    address: int
    mapping: devanon.Mapping
    page: int
    """The Anon page the mapping shows here (when no overlay covers it)."""
    writable: bool
    overlay: devanon.Overlay | None = None
    file_page: int = 0
    overlay_writable: bool = False
    private: bytes | None = None
    """Written through a writable overlay: a private copy, in neither file."""


@dataclass
class KeptView:
    """A view kept across steps: of ``mapping``, whose pages were ``keys`` when it was made."""

    mapping: devanon.Mapping
    view: memoryview
    keys: list[tuple[int, int]]
    stale: dict[int, bytes]
    """Page index -> what was written to the quarantine there (through any view of the
    mapping: all its views show the same memory, so they share this dict)."""


class AnonMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.anon = devanon.Anon(NPAGES * PS, name="test-stateful")
        fd, self.file_path = tempfile.mkstemp(prefix="devanon-overlay-")
        self.file_pages = [pattern("file", i) for i in range(FILE_PAGES)]
        os.write(fd, b"".join(self.file_pages))
        self.file_fd = fd
        # Owned address space, keyed by (arena, page index in it) and not by address: an
        # arena is the range one map_new() got from the kernel. Every draw depends on these
        # keys only, never on where the kernel put things (hypothesis replays draws, and
        # needs them to mean the same each time).
        self.slots: dict[tuple[int, int], Slot] = {}
        self.arenas = 0
        self.content: dict[int, bytes] = {}  # Anon page -> bytes written there
        self.mappings: list[devanon.Mapping] = []
        self.overlays: list[devanon.Overlay] = []
        self.seq = 0
        self.steps = 0
        self.views: list[KeptView] = []

    # -- the model -----------------------------------------------------------------------

    def model_counts(self) -> list[int]:
        counts = collections.Counter(s.page for s in self.slots.values() if s.overlay is None)
        return [counts[p] for p in range(NPAGES)]

    def settle(self) -> None:
        """Pages whose count fell to zero were punched: they hold zeros again."""
        counts = self.model_counts()
        for page in [p for p in self.content if counts[p] == 0]:
            event("a written page fell to zero")
            del self.content[page]

    def stretches(self) -> list[list[tuple[int, int]]]:
        """Maximal runs of consecutive owned pages of one arena (may span several mappings)."""
        out: list[list[tuple[int, int]]] = []
        for key in sorted(self.slots):
            if out and out[-1][-1] == (key[0], key[1] - 1):
                out[-1].append(key)
            else:
                out.append([key])
        return out

    def draw_owned(self, data: st.DataObject) -> list[tuple[int, int]]:
        """The keys of a range of owned address space (consecutive addresses)."""
        stretch = data.draw(st.sampled_from(self.stretches()), label="stretch")
        first = data.draw(st.integers(0, len(stretch) - 1), label="first")
        n = data.draw(st.integers(1, len(stretch) - first), label="npages")
        keys = stretch[first : first + n]
        owners = {self.slots[k].mapping for k in keys}
        event(f"range spans {min(len(owners), 3)}{'+' if len(owners) >= 3 else ''} mapping(s)")
        if any(self.slots[k].overlay for k in keys):
            event("range holds overlaid pages")
        return keys

    def draw_span(self, data: st.DataObject) -> tuple[int, int]:
        """``(offset page, npages)`` inside the Anon."""
        first = data.draw(st.integers(0, NPAGES - 1), label="offset page")
        return first, data.draw(st.integers(1, NPAGES - first), label="npages")

    def place(
        self, keys: list[tuple[int, int]], mapping: devanon.Mapping, first: int, writable: bool
    ) -> None:
        for i, key in enumerate(keys):
            self.slots[key] = Slot(mapping.address + i * PS, mapping, first + i, writable)
        self.mappings.append(mapping)

    # -- rules ---------------------------------------------------------------------------

    @rule(data=st.data(), writable=st.booleans())
    def map_new(self, data: st.DataObject, writable: bool) -> None:
        first, n = self.draw_span(data)
        m = self.anon.map(first * PS, n * PS, writable=writable)
        owned = {s.address for s in self.slots.values()}
        assert not any(m.address + i * PS in owned for i in range(n))
        self.arenas += 1
        self.place([(self.arenas, i) for i in range(n)], m, first, writable)

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), writable=st.booleans())
    def map_over(self, data: st.DataObject, writable: bool) -> None:
        keys = self.draw_owned(data)
        address, n = self.slots[keys[0]].address, len(keys)
        first = data.draw(st.integers(0, NPAGES - n), label="offset page")
        viewed = {v.mapping for v in self.views}
        if any(self.slots[k].mapping in viewed for k in keys):
            event("map over a mapping with a live view: refused")
            with pytest.raises(BufferError, match="live views"):
                self.anon.map(first * PS, n * PS, address=address, writable=writable)
            return
        m = self.anon.map(first * PS, n * PS, address=address, writable=writable)
        assert m.address == address
        self.place(keys, m, first, writable)
        self.settle()

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def unmap(self, data: st.DataObject) -> None:
        keys = self.draw_owned(data)
        self.anon.unmap(self.slots[keys[0]].address, len(keys) * PS)
        for key in keys:
            del self.slots[key]
        self.settle()

    @precondition(lambda self: self.slots)
    @rule(data=st.data())
    def close_mapping(self, data: st.DataObject) -> None:
        live = list(dict.fromkeys(s.mapping for s in self.slots.values()))
        m = data.draw(st.sampled_from(live), label="mapping")
        m.close()
        self.slots = {a: s for a, s in self.slots.items() if s.mapping is not m}
        self.settle()

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), writable=st.booleans(), by_path=st.booleans())
    def overlay(self, data: st.DataObject, writable: bool, by_path: bool) -> None:
        keys = self.draw_owned(data)
        address, n = self.slots[keys[0]].address, len(keys)
        file_page = data.draw(st.integers(0, FILE_PAGES - n), label="file page")
        file = self.file_path if by_path else self.file_fd
        writers = {v.mapping for v in self.views if not v.view.readonly}
        if not writable and any(self.slots[k].mapping in writers for k in keys):
            event("read-only overlay under a live writable view: refused")
            with pytest.raises(BufferError, match="writable views"):
                self.anon.overlay(address, file, file_page * PS, n * PS)
            return
        o = self.anon.overlay(address, file, file_page * PS, n * PS, writable=writable)
        self.overlays.append(o)
        for i, key in enumerate(keys):
            slot = self.slots[key]
            slot.overlay, slot.file_page = o, file_page + i
            slot.overlay_writable, slot.private = writable, None
        self.settle()

    @precondition(lambda self: any(s.overlay for s in self.slots.values()))
    @rule(data=st.data())
    def release_overlay(self, data: st.DataObject) -> None:
        live = list(dict.fromkeys(s.overlay for s in self.slots.values() if s.overlay))
        o = data.draw(st.sampled_from(live), label="overlay")
        o.release()
        for slot in self.slots.values():
            if slot.overlay is o:
                slot.overlay, slot.private = None, None

    @precondition(lambda self: any(s.writable and not s.overlay for s in self.slots.values()))
    @rule(data=st.data(), via_view=st.booleans())
    def write(self, data: st.DataObject, via_view: bool) -> None:
        candidates = [k for k, s in sorted(self.slots.items()) if s.writable and not s.overlay]
        slot = self.slots[data.draw(st.sampled_from(candidates), label="page")]
        self.seq += 1
        content = pattern("anon", self.seq, slot.page)
        self.store(slot, content, via_view)
        self.content[slot.page] = content

    @precondition(lambda self: any(s.overlay_writable for s in self.slots.values() if s.overlay))
    @rule(data=st.data(), via_view=st.booleans())
    def write_overlay(self, data: st.DataObject, via_view: bool) -> None:
        candidates = [k for k, s in sorted(self.slots.items()) if s.overlay and s.overlay_writable]
        slot = self.slots[data.draw(st.sampled_from(candidates), label="page")]
        self.seq += 1
        content = pattern("private", self.seq)
        self.store(slot, content, via_view)
        slot.private = content

    def whole_mappings(self) -> list[devanon.Mapping]:
        """Live mappings none of whose pages was unmapped or mapped over (view() works)."""
        pages = collections.Counter(s.mapping for s in self.slots.values())
        return [m for m, n in pages.items() if n == m.length // PS]

    @precondition(lambda self: len(self.views) < 2 and self.whole_mappings())
    @rule(data=st.data())
    def keep_view(self, data: st.DataObject) -> None:
        m = data.draw(st.sampled_from(self.whole_mappings()), label="mapping")
        keys = sorted(k for k, s in self.slots.items() if s.mapping is m)
        stale = next((v.stale for v in self.views if v.mapping is m), {})
        view = m.view()
        read_only_overlay = any(
            s.overlay and not s.overlay_writable for s in self.slots.values() if s.mapping is m
        )
        assert view.readonly == (not m.writable or read_only_overlay)
        self.views.append(KeptView(m, view, keys, stale))

    @precondition(lambda self: self.views)
    @rule(data=st.data())
    def drop_view(self, data: st.DataObject) -> None:
        kept = self.views.pop(data.draw(st.integers(0, len(self.views) - 1), label="view"))
        kept.view.release()

    @precondition(lambda self: any(not v.view.readonly for v in self.views))
    @rule(data=st.data())
    def write_stale_view(self, data: st.DataObject) -> None:
        """Write through a kept view where its mapping was unmapped: into the quarantine."""
        kept = data.draw(st.sampled_from([v for v in self.views if not v.view.readonly]))
        gone = [i for i, k in enumerate(kept.keys) if k not in self.slots]
        if not gone:
            return
        event("write through a stale view")
        i = data.draw(st.sampled_from(gone), label="page in view")
        self.seq += 1
        kept.stale[i] = pattern("stale", self.seq)
        kept.view[i * PS : (i + 1) * PS] = kept.stale[i]

    @precondition(lambda self: self.slots)
    @rule(data=st.data(), op=st.sampled_from(["unmap", "map", "overlay"]))
    def refuse_unowned(self, data: st.DataObject, op: str) -> None:
        """A range one page past an owned stretch: ValueError, and nothing changes."""
        stretch = [self.slots[k].address for k in data.draw(st.sampled_from(self.stretches()))]
        if data.draw(st.booleans(), label="before"):
            address, n = stretch[0] - PS, 1 + data.draw(st.integers(0, len(stretch) - 1))
            outside = address
        else:
            address = stretch[data.draw(st.integers(0, len(stretch) - 1), label="first")]
            n = (stretch[-1] - address) // PS + 2
            outside = stretch[-1] + PS
        if any(s.address == outside for s in self.slots.values()):
            event("refuse_unowned: the kernel put another arena right there")
            return
        # (A 33-page map is refused for its length before its address is looked at.)
        refusal = "past the end" if op == "map" and n > NPAGES else "not all mapped"
        with pytest.raises(ValueError, match=refusal):
            if op == "unmap":
                self.anon.unmap(address, n * PS)
            elif op == "map":
                self.anon.map(0, n * PS, address=address)
            else:
                self.anon.overlay(address, self.file_fd, 0, n * PS)

    def store(self, slot: Slot, content: bytes, via_view: bool) -> None:
        """Write a page at ``slot``: through a view of its mapping, or raw.

        A view lives only for this write: a live view would make unmapping quarantine.
        (The view of a read-only mapping is read-only, even over a writable overlay.)
        """
        mapping, address = slot.mapping, slot.address
        if via_view and mapping.writable:
            try:
                view = mapping.view()
            except ValueError:  # a piece of it is gone: no view of it
                event("view refused: mapping not whole")
            else:
                if view.readonly:  # a read-only overlay lies on another piece of it
                    event("view read-only: a read-only overlay on the mapping")
                    view.release()
                    del view
                    ctypes.memmove(address, content, PS)
                    return
                try:
                    start = address - mapping.address
                    view[start : start + PS] = content
                finally:
                    view.release()
                    del view
                return
        ctypes.memmove(address, content, PS)

    # -- invariants: the kernel is the oracle ------------------------------------------

    @invariant()
    def counts_match_the_kernel(self) -> None:
        self.steps += 1
        kernel = oracle.maps_counts(self.anon.fd, PS)
        kernel_counts = [kernel.get(p, 0) for p in range(NPAGES)]
        devanon_counts = [self.anon.map_count(p * PS) for p in range(NPAGES)]
        assert devanon_counts == kernel_counts
        assert kernel_counts == self.model_counts()

    @invariant()
    def file_holds_exactly_the_written_pages(self) -> None:
        fd = self.anon.fd
        for page in range(NPAGES):
            got = os.pread(fd, PS, page * PS)
            assert got == self.content.get(page, ZEROS), f"page {page}"
        assert oracle.data_pages(fd, NPAGES * PS, PS) == set(self.content)
        assert oracle.resident_bytes(fd) == len(self.content) * PS
        assert self.anon.resident_bytes() == len(self.content) * PS

    @invariant()
    def mappings_show_their_pages(self) -> None:
        for slot in self.slots.values():
            if slot.overlay is not None:
                expected = slot.private or self.file_pages[slot.file_page]
            elif slot.page in self.content:
                expected = self.content[slot.page]
            else:
                continue  # a read fault here would fill the hole
            assert ctypes.string_at(slot.address, PS) == expected, f"{slot}"
        assert os.pread(self.file_fd, FILE_PAGES * PS, 0) == b"".join(self.file_pages)

    @invariant()
    def kept_views_show_their_pages_or_zeros(self) -> None:
        for kept in self.views:
            for i, key in enumerate(kept.keys):
                slot = self.slots.get(key)
                if slot is None:  # unmapped while the view lived: quarantined
                    expected = kept.stale.get(i, ZEROS)
                elif slot.overlay is not None:
                    assert slot.mapping is kept.mapping
                    expected = slot.private or self.file_pages[slot.file_page]
                elif slot.page in self.content:
                    assert slot.mapping is kept.mapping
                    expected = self.content[slot.page]
                else:
                    continue
                assert kept.view[i * PS : (i + 1) * PS] == expected, f"{kept.mapping} page {i}"

    @invariant()
    def handles_know_what_is_left(self) -> None:
        live_mappings = {s.mapping for s in self.slots.values()}
        live_overlays = {s.overlay for s in self.slots.values() if s.overlay}
        for m in self.mappings:
            assert m.closed == (m not in live_mappings), m
        for o in self.overlays:
            assert o.released == (o not in live_overlays), o
        stats = self.anon.stats()
        assert (stats.mappings, stats.overlays) == (len(live_mappings), len(live_overlays))
        assert stats.mapped_bytes == sum(c > 0 for c in self.model_counts()) * PS

    def teardown(self) -> None:
        anon_id = oracle.file_id(self.anon.fd)
        file_id = oracle.file_id(self.file_fd)
        try:
            if sys.exc_info()[0] is not None:
                return  # a step failed (teardown runs in hypothesis's finally): just clean up
            if self.steps % 2:
                # Close the mappings one by one: the last close leaves nothing resident.
                for m in dict.fromkeys(s.mapping for s in self.slots.values()):
                    m.close()
                assert [self.anon.map_count(p * PS) for p in range(NPAGES)] == [0] * NPAGES
                assert oracle.maps_counts(self.anon.fd, PS) == {}
                assert oracle.data_pages(self.anon.fd, NPAGES * PS, PS) == set()
                assert self.anon.resident_bytes() == 0
                # A new mapping reads zeros (its read faults fill the holes: punched again
                # when it closes).
                with self.anon.map(0, NPAGES * PS) as m:
                    assert ctypes.string_at(m.address, NPAGES * PS) == bytes(NPAGES * PS)
                assert self.anon.resident_bytes() == 0
            # Anon.close() unmaps whatever is left (mappings and overlays), and quarantines
            # what kept views show.
            self.anon.close()
            assert oracle.maps_entries(anon_id) == []
            assert oracle.maps_entries(file_id) == []
            for kept in self.views:
                for i in range(len(kept.keys)):
                    assert kept.view[i * PS : (i + 1) * PS] == kept.stale.get(i, ZEROS)
        finally:
            self.anon.close()
            for kept in self.views:
                kept.view.release()
            self.views.clear()
            os.close(self.file_fd)
            os.unlink(self.file_path)


AnonMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
TestAnonAgainstKernel = AnonMachine.TestCase
