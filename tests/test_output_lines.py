"""Lines out of a child process's output, as the worker pool and the store process read
them: pieces that end anywhere, and an unfinished line held only up to a limit."""

from __future__ import annotations

from clientid_mta.output_lines import OutputLines


def test_lines_are_whole_whatever_the_pieces() -> None:
    lines = OutputLines(100)
    assert lines.feed(b"one\ntw") == [b"one"]
    assert lines.feed(b"o") == []
    assert lines.feed(b"\n\nthree\nfo") == [b"two", b"", b"three"]
    assert lines.feed(b"ur\n") == [b"four"]
    assert not lines.too_long


def test_an_unfinished_line_over_the_limit_is_seen_and_can_be_cut_to_its_end() -> None:
    lines = OutputLines(4)
    assert lines.feed(b"abcd") == [] and not lines.too_long
    assert lines.feed(b"efg") == [] and lines.too_long
    lines.keep_end()
    assert not lines.too_long
    assert lines.feed(b"h\nnext") == [b"defgh"]


def test_clear_forgets_the_unfinished_line() -> None:
    lines = OutputLines(10)
    lines.feed(b"half")
    lines.clear()
    assert lines.feed(b"new\n") == [b"new"]
