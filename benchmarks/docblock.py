"""Writing a benchmark's table into its docs/ page, between the script's own markers."""

from __future__ import annotations

from pathlib import Path


def replace_block(doc: Path, begin: str, end: str, block: str, title: str) -> None:
    """Put `block` (which starts with `begin` and ends with `end`) in place of the old one in `doc`.

    The rest of the page is kept; a page or a pair of markers that does not exist yet is added.
    """
    text = doc.read_text() if doc.is_file() else f"# {title}\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    doc.write_text(text)
