"""Disk images: a root directory laid out as one image file plus a manifest.

The manifest says where each file's bytes live in the image, as page-aligned extents of
blocks, so a trace recorded against the root directory (path, offset, length) replays onto
disk blocks. The builder lays each file out contiguously, in sorted path order, and pads it
with zeros to a block boundary: a file's neighbouring pages are neighbouring blocks, which
is what lets ubd-mmap map whole extents with one ``mmap`` call.

The manifest is JSON, written beside the image as ``IMAGE.manifest.json``::

    {"format": "devanon-manifest", "version": 1, "block_size": 4096, "image_size": ...,
     "files": [["path/relative/to/root", size, [[first_block, blocks], ...]], ...]}
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from devanon.anon import PAGE_SIZE
from devanon.units import Block

MANIFEST_FORMAT = "devanon-manifest"
MANIFEST_VERSION = 1
IMAGE_VERSION = "1"
"""Bumped whenever the layout changes, so cached images are rebuilt."""


@dataclass(slots=True, frozen=True)
class Extent:
    """``count`` blocks of the image from ``block``: consecutive pages of one file."""

    block: Block
    count: int


@dataclass(slots=True, frozen=True)
class FileEntry:
    """Where one file of the root lives in the image."""

    path: str
    size: int
    extents: tuple[Extent, ...]

    @property
    def pages(self) -> int:
        return sum(e.count for e in self.extents)


@dataclass(slots=True, frozen=True)
class Piece:
    """``count`` pages of a file from page ``page``, stored in blocks from ``block``."""

    page: int
    block: Block
    count: int


class Manifest:
    """File -> extents of an image; looks up the blocks behind a range of a file."""

    def __init__(self, files: Sequence[FileEntry], block_size: int, image_size: int) -> None:
        if block_size <= 0 or block_size % PAGE_SIZE:
            raise ValueError(f"block_size {block_size} is not a multiple of the page size")
        self.block_size = block_size
        self.image_size = image_size
        self.files: dict[str, FileEntry] = {f.path: f for f in files}

    def __len__(self) -> int:
        return len(self.files)

    def __contains__(self, path: object) -> bool:
        return path in self.files

    def entry(self, path: str) -> FileEntry:
        """The file's entry; ``KeyError`` naming the path if the image lacks it."""
        try:
            return self.files[path]
        except KeyError:
            raise KeyError(f"{path!r} is not in the image") from None

    def pieces(self, path: str, page: int, count: int) -> list[Piece]:
        """The blocks behind pages ``[page, page+count)`` of ``path``, split at extents.

        ``ValueError`` naming the file if the pages reach past its end.
        """
        entry = self.entry(path)
        if page < 0 or count <= 0 or page + count > entry.pages:
            raise ValueError(
                f"pages [{page}, {page + count}) of {path!r} reach past its end "
                f"({entry.pages} pages, {entry.size} bytes)"
            )
        out: list[Piece] = []
        first = 0  # file page where the current extent starts
        for ext in entry.extents:
            lo, hi = max(page, first), min(page + count, first + ext.count)
            if lo < hi:
                out.append(Piece(lo, Block(ext.block + lo - first), hi - lo))
            first += ext.count
        return out

    def to_json(self) -> str:
        files = [
            [f.path, f.size, [[int(e.block), e.count] for e in f.extents]]
            for f in self.files.values()
        ]
        return json.dumps(
            {
                "format": MANIFEST_FORMAT,
                "version": MANIFEST_VERSION,
                "block_size": self.block_size,
                "image_size": self.image_size,
                "files": files,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str, source: str = "<manifest>") -> Manifest:
        """Parse a manifest; ``ValueError`` naming ``source`` if it is not one."""
        try:
            data = json.loads(text)
            if data.get("format") != MANIFEST_FORMAT or data.get("version") != MANIFEST_VERSION:
                raise ValueError("not a devanon manifest of version 1")
            files = [
                FileEntry(str(p), int(size), tuple(Extent(Block(int(b)), int(n)) for b, n in ext))
                for p, size, ext in data["files"]
            ]
            return cls(files, int(data["block_size"]), int(data["image_size"]))
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{source}: not a valid manifest ({e})") from None

    def save(self, path: str | os.PathLike[str]) -> None:
        Path(path).write_text(self.to_json(), encoding="utf-8")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        return cls.from_json(Path(path).read_text(encoding="utf-8"), os.fspath(path))


def manifest_path(image: str | os.PathLike[str]) -> Path:
    """Where the manifest of ``image`` lives."""
    return Path(os.fspath(image) + ".manifest.json")


def walk_root(root: str | os.PathLike[str], exclude: Sequence[str] = ()) -> Iterator[str]:
    """Regular files under ``root`` (relative paths, sorted), skipping names matching
    ``exclude`` (fnmatch patterns on each path component) and symbolic links."""
    base = os.fspath(root)

    def walk(rel: str) -> Iterator[str]:
        try:
            entries = sorted(os.scandir(os.path.join(base, rel)), key=lambda e: e.name)
        except PermissionError:
            return
        for entry in entries:
            if any(fnmatch.fnmatch(entry.name, pat) for pat in exclude):
                continue
            path = f"{rel}/{entry.name}" if rel else entry.name
            if entry.is_symlink() or "\t" in path or "\n" in path:
                continue
            if entry.is_dir():
                yield from walk(path)
            elif entry.is_file():
                yield path

    yield from walk("")


def build_image(
    root: str | os.PathLike[str],
    image: str | os.PathLike[str],
    *,
    exclude: Sequence[str] = (),
    block_size: int = PAGE_SIZE,
) -> Manifest:
    """Lay the files under ``root`` out in ``image`` (made anew) and write its manifest.

    Each file gets one extent of whole blocks; unreadable files are left out. The image is
    fsynced, so its page cache is clean and can be dropped before a measurement.
    """
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        raise NotADirectoryError(20, f"root {root_s!r} is not a directory")
    image_p = Path(image)
    tmp = image_p.with_name(image_p.name + f".tmp{os.getpid()}")
    files: list[FileEntry] = []
    next_block = 0
    out = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        for rel in walk_root(root_s, exclude):
            try:
                src = os.open(os.path.join(root_s, rel), os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                continue
            try:
                size = os.fstat(src).st_size
                blocks = -(-size // block_size)
                if size:
                    _copy(src, out, size, next_block * block_size)
                files.append(
                    FileEntry(rel, size, (Extent(Block(next_block), blocks),) if blocks else ())
                )
                next_block += blocks
            finally:
                os.close(src)
        os.ftruncate(out, next_block * block_size)
        os.fsync(out)
    except BaseException:
        os.close(out)
        tmp.unlink(missing_ok=True)
        raise
    os.close(out)
    manifest = Manifest(files, block_size, next_block * block_size)
    manifest.save(manifest_path(image_p))
    os.replace(tmp, image_p)
    return manifest


def scan_root(
    root: str | os.PathLike[str], *, exclude: Sequence[str] = (), block_size: int = PAGE_SIZE
) -> Manifest:
    """The manifest ``build_image`` would write for ``root``, without writing an image."""
    root_s = os.fspath(root)
    if not os.path.isdir(root_s):
        raise NotADirectoryError(20, f"root {root_s!r} is not a directory")
    files: list[FileEntry] = []
    next_block = 0
    for rel in walk_root(root_s, exclude):
        try:
            size = os.stat(os.path.join(root_s, rel)).st_size
        except OSError:
            continue
        blocks = -(-size // block_size)
        files.append(FileEntry(rel, size, (Extent(Block(next_block), blocks),) if blocks else ()))
        next_block += blocks
    return Manifest(files, block_size, next_block * block_size)


def _copy(src: int, dst: int, size: int, at: int) -> None:
    """Copy ``size`` bytes of ``src`` (from 0) to ``dst`` at ``at``, in the kernel if it can."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(src, dst, size - done, done, at + done)
            if n == 0:
                break
            done += n
    except OSError:
        pass
    while done < size:
        chunk = os.pread(src, min(size - done, 1 << 20), done)
        if not chunk:
            break
        os.pwrite(dst, chunk, at + done)
        done += len(chunk)


def fingerprint(root: str | os.PathLike[str], exclude: Sequence[str] = ()) -> str:
    """A hash of the root's file list, sizes and modification times (and the layout)."""
    h = hashlib.sha256(f"{IMAGE_VERSION}\0{os.path.abspath(root)}\0{list(exclude)}".encode())
    for rel in walk_root(root, exclude):
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def cached_image(
    root: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str],
    *,
    exclude: Sequence[str] = (),
    name: str = "root",
) -> tuple[Path, Manifest]:
    """The image of ``root`` in ``cache_dir``, built only if the root changed since."""
    os.makedirs(cache_dir, exist_ok=True)
    image = Path(cache_dir) / f"{name}-{fingerprint(root, exclude)}.img"
    if image.exists() and manifest_path(image).exists():
        try:
            manifest = Manifest.load(manifest_path(image))
        except ValueError:
            pass
        else:
            if image.stat().st_size == manifest.image_size:  # not cut short since
                return image, manifest
    for old in Path(cache_dir).glob(f"{name}-*.img*"):
        old.unlink(missing_ok=True)
    return image, build_image(root, image, exclude=exclude)
