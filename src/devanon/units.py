"""The four kinds of numbers that meet in ubd-mmap, each with its own name.

A host ``Address`` (where this process sees memory), an ``Offset`` in an Anon (a guest
physical address), a guest ``Frame`` (a page of guest memory) and a disk ``Block`` (a page of
the disk image). Passing one for another is the classic bug of this field (rust-vmm's
vm-memory keeps ``GuestAddress`` apart for the same reason); converting happens in one place
each: ``PhysicalMemory`` turns frames into addresses and offsets, the image manifest turns
file pages into blocks.
"""

from __future__ import annotations

from typing import NewType

Address = NewType("Address", int)
"""A virtual address in this process."""
Offset = NewType("Offset", int)
"""A byte offset in an Anon: a guest physical address."""
Frame = NewType("Frame", int)
"""A guest page frame number: ``Offset // page size``."""
Block = NewType("Block", int)
"""A disk block (one page) of an image: ``image byte offset // block size``."""
