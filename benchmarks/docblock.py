"""Writing a benchmark's table into its docs/ page, between the script's own markers."""

from __future__ import annotations

from pathlib import Path


def publish_block(doc: Path, begin: str, end: str, lines: list[str], title: str, *, publish: bool = True) -> None:
    """Put `lines` between the markers `begin` and `end` in `doc` (replacing what was there), and print them.

    The rest of the page is kept; a page or a pair of markers that does not exist yet is added.
    With `publish` False (a benchmark's `--no-doc`) the lines are only printed.
    """
    if not publish:
        print("\n".join(lines))
        return
    block = "\n".join([begin, *lines, end])
    text = doc.read_text() if doc.is_file() else f"# {title}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
    print(block)
