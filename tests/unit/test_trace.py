"""Trace parsing: the format of DESIGN.md, bad lines refused with their line number."""

from __future__ import annotations

import re

import pytest

from devanon.trace import TraceError, format_trace, load_trace, parse_trace

GOOD = """# devanon trace
# guest_other_bytes: 8192
# command: python -c pass

a.py\t0\t100
dir/b.pyc\t4096\t5000
# a plain comment
a.py\t50\t10
"""


def test_reads_metadata_and_comments() -> None:
    t = parse_trace(GOOD, "good.trace")
    assert [(r.line, r.path, r.offset, r.length) for r in t.reads] == [
        (5, "a.py", 0, 100),
        (6, "dir/b.pyc", 4096, 5000),
        (8, "a.py", 50, 10),
    ]
    assert t.meta["command"] == "python -c pass"
    assert t.guest_other_bytes == 8192
    assert t.total_bytes() == 5110


def test_distinct_bytes_counts_pages_once() -> None:
    t = parse_trace(GOOD)
    # a.py page 0 (twice); b.pyc bytes 4096..9096: pages 1 and 2
    assert t.distinct_bytes(4096) == 3 * 4096


@pytest.mark.parametrize(
    ("line", "words"),
    [
        ("a.py\t0", "got 2 field(s)"),
        ("a.py\t0\t1\t2", "got 4 field(s)"),
        ("a.py\tx\t1", "must be integers"),
        ("a.py\t0\t-1", "must be integers"),
        ("a.py\t0\t0", "length > 0"),
        ("/etc/passwd\t0\t1", "absolute"),
        ("../x\t0\t1", "'..'"),
        ("\t0\t1", "empty path"),
    ],
)
def test_bad_line_is_refused_with_its_number(line: str, words: str) -> None:
    with pytest.raises(TraceError, match=rf"t\.trace:3: .*{re.escape(words)}"):
        parse_trace(f"# x\nok\t0\t1\n{line}\n", "t.trace")


def test_distinct_bytes_of_overlapping_and_huge_reads_walks_no_page() -> None:
    t = parse_trace(
        "a\t0\t8192\na\t4096\t8192\nb\t0\t1\na\t100000\t1\n"
        f"big\t{1 << 50}\t{1 << 50}\n"  # 2**38 pages: a page walk would never end
    )
    assert t.distinct_bytes(4096) == (3 + 1 + 1) * 4096 + (1 << 50)


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (f"a\t{'9' * 5000}\t1", "past what a file can hold"),
        (f"a\t{1 << 62}\t{1 << 62}", "past what a file can hold"),
    ],
)
def test_numbers_past_a_files_size_are_refused_by_line(line: str, words: str) -> None:
    with pytest.raises(TraceError, match=rf"t\.trace:1: .*{re.escape(words)}"):
        parse_trace(f"{line}\n", "t.trace")


def test_bad_metadata_value_is_refused() -> None:
    with pytest.raises(TraceError, match=r":1: guest_other_bytes must be an integer.*'lots'"):
        parse_trace("# guest_other_bytes: lots\n")


def test_format_round_trips() -> None:
    reads = [("x/y.py", 0, 10), ("z", 4096, 1)]
    t = parse_trace(format_trace(reads, {"guest_other_bytes": 4096}))
    assert [(r.path, r.offset, r.length) for r in t.reads] == reads
    assert t.guest_other_bytes == 4096


def test_format_refuses_unrepresentable_paths() -> None:
    with pytest.raises(ValueError, match="tab"):
        format_trace([("a\tb", 0, 1)])


def test_missing_file_is_named(tmp_path: object) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.trace"):
        load_trace("/nonexistent/nope.trace")


def test_only_newlines_end_lines() -> None:
    # a form feed in metadata (a recorded command line, say) is no line break
    text = format_trace([("a", 0, 1)], {"command": "python -c 'print(\"\x0c\x1c\u2028\")'"})
    assert parse_trace(text).reads[0].path == "a"
    bad = "# x\x0cy\nok\t0\t1\nbad line\n"
    with pytest.raises(TraceError, match=":3:"):
        parse_trace(bad, "t")


def test_leading_zeros_do_not_make_a_number_big() -> None:
    t = parse_trace(f"# guest_other_bytes: {'0' * 5000}7\na\t{'0' * 5000}1\t1\n")
    assert t.guest_other_bytes == 7 and t.reads[0].offset == 1


def test_metadata_past_a_files_size_is_refused() -> None:
    with pytest.raises(TraceError, match=r":1: guest_other_bytes must be an integer below"):
        parse_trace(f"# guest_other_bytes: {1 << 63}\n")
