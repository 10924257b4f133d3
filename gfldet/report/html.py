"""The report page: one HTML file with inline style that shows the PNGs beside it (no server,
no script, nothing fetched)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

# Recognises a page this module wrote, so that a report folder can be refreshed but a user's
# folder is never written into.
MARKER = '<meta name="generator" content="gfldet report">'

STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; border: 1px solid #eee; }
.gallery { display: flex; flex-wrap: wrap; gap: 8px; }
.gallery figure { margin: 0; max-width: 340px; font-size: 0.8em; }
.source { color: #555; }
dt { font-weight: bold; } dd { margin: 0 0 0.4em 1.5em; }
"""


def fmt(value: float | int | None, digits: int = 3) -> str:
    """A table cell; "-" for no value (None, nan, or pycocotools' -1: no ground truth)."""
    if value is None or (isinstance(value, float) and (math.isnan(value) or value == -1.0)):
        return "-"
    return str(value) if isinstance(value, int) else f"{value:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{escape(c if isinstance(c, str) else fmt(c))}</td>"
                                    for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def image(src: str, alt: str) -> str:
    return f'<img src="{escape(src)}" alt="{escape(alt)}">'


def page(title: str, sections: Sequence[tuple[str, str]], subtitle: str = "") -> str:
    """A whole page: `sections` are (heading, HTML body) pairs, with a table of contents;
    `subtitle` (what the page describes) goes under the title."""
    toc = "".join(f'<li><a href="#s{i}">{escape(h)}</a></li>' for i, (h, _) in enumerate(sections))
    body = "".join(f'<h2 id="s{i}">{escape(h)}</h2>\n{b}\n' for i, (h, b) in enumerate(sections))
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">{MARKER}'
            f"<title>{escape(title)}</title><style>{STYLE}</style></head>\n"
            f"<body><h1>{escape(title)}</h1>"
            + (f'<p class="source">{escape(subtitle)}</p>' if subtitle else "")
            + f"<ul>{toc}</ul>\n{body}</body></html>\n")


def definitions(terms: Mapping[str, str]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in terms.items())
    return f"<dl>{items}</dl>"
