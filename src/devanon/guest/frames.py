"""The guest's frame allocator: free frames as sorted runs, handed out as runs.

ubd-mmap maps one extent per run of contiguous frames holding contiguous blocks, and the
kernel merges neighbouring overlays of one file into one VMA only if they are neighbours in
both memory and file. So the allocator hands out contiguous runs where it can, and takes a
hint: "the frame right after the previous page of this file", which keeps a file read in
pieces in one run of frames (and one VMA), as long as that frame is free.
"""

from __future__ import annotations

from bisect import bisect_right

from devanon.units import Frame


class OutOfFrames(MemoryError):
    """Not enough free frames for a request."""


class FrameAllocator:
    """Frames ``[0, frames)``, all free at first."""

    def __init__(self, frames: int) -> None:
        if frames <= 0:
            raise ValueError(f"a guest needs at least one frame, not {frames}")
        self.frames = frames
        self._starts: list[int] = [0]
        self._ends: list[int] = [frames]
        self.free_frames = frames

    def runs(self) -> list[tuple[Frame, int]]:
        """The free runs, ``(first, count)``, in order."""
        return [(Frame(a), b - a) for a, b in zip(self._starts, self._ends, strict=True)]

    def alloc(self, count: int, *, near: Frame | None = None) -> list[tuple[Frame, int]]:
        """``count`` frames as runs ``(first, n)``; ``OutOfFrames`` if fewer are free.

        From ``near`` onwards first if that frame is free, then the first free run big
        enough for the rest, then the largest runs.
        """
        if count <= 0:
            raise ValueError(f"cannot allocate {count} frames")
        if count > self.free_frames:
            raise OutOfFrames(f"{count} frames wanted, {self.free_frames} free")
        out: list[tuple[Frame, int]] = []
        need = count
        if near is not None and 0 <= near < self.frames:
            k = bisect_right(self._starts, near) - 1
            if k >= 0 and self._starts[k] <= near < self._ends[k]:
                n = min(need, self._ends[k] - near)
                self._take(k, near, n)
                out.append((Frame(near), n))
                need -= n
        while need:
            k = next((i for i, (a, b) in enumerate(self._spans()) if b - a >= need), -1)
            if k < 0:
                k = max(range(len(self._starts)), key=lambda i: self._ends[i] - self._starts[i])
            start = self._starts[k]
            n = min(need, self._ends[k] - start)
            self._take(k, start, n)
            out.append((Frame(start), n))
            need -= n
        return out

    def free(self, frame: Frame, count: int) -> None:
        """Give back ``[frame, frame+count)``; ``ValueError`` naming it if any is free."""
        if count <= 0 or frame < 0 or frame + count > self.frames:
            raise ValueError(f"frames [{frame}, {frame + count}) are not guest frames")
        k = bisect_right(self._starts, frame)
        if (k > 0 and self._ends[k - 1] > frame) or (
            k < len(self._starts) and self._starts[k] < frame + count
        ):
            raise ValueError(f"frames [{frame}, {frame + count}) are already (partly) free")
        end = frame + count
        join_left = k > 0 and self._ends[k - 1] == frame
        join_right = k < len(self._starts) and self._starts[k] == end
        if join_left and join_right:
            self._ends[k - 1] = self._ends[k]
            del self._starts[k], self._ends[k]
        elif join_left:
            self._ends[k - 1] = end
        elif join_right:
            self._starts[k] = frame
        else:
            self._starts.insert(k, frame)
            self._ends.insert(k, end)
        self.free_frames += count

    def _spans(self) -> zip[tuple[int, int]]:
        return zip(self._starts, self._ends, strict=True)

    def _take(self, k: int, start: int, n: int) -> None:
        """Remove ``[start, start+n)`` from free run ``k`` (which holds it)."""
        a, b = self._starts[k], self._ends[k]
        if start == a and start + n == b:
            del self._starts[k], self._ends[k]
        elif start == a:
            self._starts[k] = start + n
        elif start + n == b:
            self._ends[k] = start
        else:
            self._ends[k] = start
            self._starts.insert(k + 1, start + n)
            self._ends.insert(k + 1, b)
        self.free_frames -= n
