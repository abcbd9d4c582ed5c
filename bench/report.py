"""Write a benchmark's output into a docs page between its markers, keeping the prose around them."""

from __future__ import annotations

from pathlib import Path


def replace_block(page: str, name: str, block: str) -> str:
    """`page` with `block` between `<!-- NAME: begin -->` and `<!-- NAME: end -->` (added at the end if absent)."""
    begin, end = f"<!-- {name}: begin -->", f"<!-- {name}: end -->"
    if begin in page and end in page:
        return page[: page.index(begin)] + f"{begin}\n{block}\n{end}" + page[page.index(end) + len(end) :]
    return page + ("\n" if page else "") + f"{begin}\n{block}\n{end}\n"


def write_block(path: Path, name: str, block: str, title: str) -> None:
    page = path.read_text() if path.exists() else f"# {title}\n"
    path.write_text(replace_block(page, name, block))
