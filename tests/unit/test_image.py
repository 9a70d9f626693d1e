"""Images and manifests: page-aligned extents, look-ups, and compiled plans."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from devanon.guest.plan import Plan
from devanon.image import Extent, FileEntry, Manifest, build_image, manifest_path, scan_root
from devanon.trace import parse_trace
from devanon.units import Block

PS = 4096


def make_root(root: Path) -> dict[str, bytes]:
    files = {
        "a.txt": b"A" * 5000,
        "empty": b"",
        "sub/b.bin": bytes(range(256)) * 40,
        "sub/deeper/c": b"c" * 4096,
        "site-packages/skip.py": b"x",
    }
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    os.symlink("a.txt", root / "link")
    return files


def test_build_lays_files_out_in_whole_blocks(tmp_path: Path) -> None:
    files = make_root(tmp_path / "root")
    image = tmp_path / "disk.img"
    m = build_image(tmp_path / "root", image, exclude=("site-packages",))
    assert sorted(m.files) == ["a.txt", "empty", "sub/b.bin", "sub/deeper/c"]  # no link
    data = image.read_bytes()
    assert len(data) == m.image_size and m.image_size % PS == 0
    for path, entry in m.files.items():
        assert entry.size == len(files[path])
        for ext in entry.extents:
            got = data[ext.block * PS : (ext.block + ext.count) * PS]
            assert got[: entry.size] == files[path]
            assert got[entry.size :] == bytes(len(got) - entry.size)  # zero padding
    assert Manifest.load(manifest_path(image)).to_json() == m.to_json()
    assert scan_root(tmp_path / "root", exclude=("site-packages",)).to_json() == m.to_json()


def test_pieces_split_at_extents() -> None:
    m = Manifest(
        [FileEntry("f", 5 * PS, (Extent(Block(10), 2), Extent(Block(40), 3)))], PS, 50 * PS
    )
    assert [(p.page, p.block, p.count) for p in m.pieces("f", 1, 3)] == [(1, 11, 1), (2, 40, 2)]
    with pytest.raises(ValueError, match=r"pages \[4, 6\) of 'f' reach past its end"):
        m.pieces("f", 4, 2)
    with pytest.raises(KeyError, match="'g' is not in the image"):
        m.pieces("g", 0, 1)


def test_bad_manifest_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "m.json"
    bad.write_text('{"format": "other"}')
    with pytest.raises(ValueError, match=r"m\.json: not a valid manifest"):
        Manifest.load(bad)


def test_plan_skips_and_reports_bad_lines(tmp_path: Path) -> None:
    make_root(tmp_path / "root")
    m = build_image(tmp_path / "root", tmp_path / "disk.img")
    trace = parse_trace(
        "# guest_other_bytes: 4096\n"
        "a.txt\t0\t5000\n"
        "missing.py\t0\t10\n"
        "sub/b.bin\t10000\t300\n"  # the file has 10240 bytes
        "sub/b.bin\t4000\t200\n"
    )
    plan = Plan.compile(trace, m)
    assert [(p.line, p.path) for p in plan.problems] == [(3, "missing.py"), (4, "sub/b.bin")]
    assert "no such file" in plan.problems[0].reason
    assert "reaches past the end of the file (10240 bytes)" in plan.problems[1].reason
    assert "line 4" in str(plan.problems[1]) and "skipped" in str(plan.problems[1])
    assert plan.reads == 2 and plan.lines == 4
    assert plan.distinct_bytes == 4 * PS  # a.txt pages 0-1, b.bin pages 0-1
    assert plan.guest_other_bytes == 4096
    saved = tmp_path / "plan.bin"
    plan.save(saved)
    again = Plan.load(saved)
    for name in ("read_line", "read_file", "read_offset", "read_length", "read_piece"):
        assert getattr(again, name) == getattr(plan, name)
    assert (again.paths, again.distinct_bytes) == (plan.paths, plan.distinct_bytes)
    head = plan.head(1)
    assert head.reads == 1 and list(head.read_piece) == [0, 1]
    (tmp_path / "junk").write_bytes(b"junk\n")
    with pytest.raises(ValueError, match="is not a devanon plan"):
        Plan.load(tmp_path / "junk")


def test_a_cached_image_cut_short_is_built_again(tmp_path: Path) -> None:
    from devanon.image import cached_image

    make_root(tmp_path / "root")
    image, manifest = cached_image(tmp_path / "root", tmp_path / "cache")
    whole = image.read_bytes()
    with open(image, "r+b") as f:
        f.truncate(len(whole) - PS)
    again, manifest2 = cached_image(tmp_path / "root", tmp_path / "cache")
    assert again == image and again.read_bytes() == whole
    assert manifest2.to_json() == manifest.to_json()
