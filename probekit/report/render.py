"""Writing a report: figures (PNG, SVG), CSV tables, a self-contained ``index.html`` and ``summary.md``.

The page embeds every figure as a base64 PNG and carries its own CSS: it opens from disk with
no server, no script and no network.
"""

from __future__ import annotations

import base64
import html
import re
import struct
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from probekit import plot
from probekit.report.base import FigureItem, Section, TableItem

DPI = 150
CSS = """
:root { --ink: #1f2328; --muted: #5b6470; --line: #d8dee4; --accent: #0b6e8a; --hi: #fff4d6; }
* { box-sizing: border-box; }
body { margin: 0; color: var(--ink); background: #fff; line-height: 1.45;
       font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
header { padding: 24px 32px 12px; border-bottom: 1px solid var(--line); background: #f6f8fa; }
header h1 { margin: 0 0 4px; font-size: 24px; }
.meta { color: var(--muted); margin: 0 0 10px; font-size: 13px; }
nav a { margin-right: 14px; color: var(--accent); text-decoration: none; font-size: 14px; }
main { padding: 8px 32px 48px; }
section { margin-top: 28px; }
h2 { font-size: 19px; border-bottom: 1px solid var(--line); padding-bottom: 4px; }
figure { margin: 18px 0 26px; }
.scroll { overflow-x: auto; }
figure img { display: block; height: auto; }  /* shrinks to the page down to 70%, then scrolls */
figcaption, .caption { color: var(--muted); font-size: 13.5px; max-width: 1100px; margin-top: 6px; }
figcaption a, .caption a { color: var(--accent); }
table { border-collapse: collapse; font-size: 13px; font-variant-numeric: tabular-nums; }
th, td { padding: 3px 10px; border-bottom: 1px solid var(--line); text-align: left; white-space: nowrap; }
th { background: #f6f8fa; position: sticky; top: 0; }
.n { text-align: right; }
tr.hi td { background: var(--hi); }
"""


@dataclass
class Rendered:
    """A figure written to disk: its files, PNG bytes and display size in CSS pixels."""

    item: FigureItem
    png: bytes
    width: int
    height: int


def save_figure(item: FigureItem, folder: Path) -> Rendered:
    """Write ``folder/<name>.png`` and ``.svg``; return the PNG for embedding."""
    folder.mkdir(parents=True, exist_ok=True)
    png_path = folder / f"{item.name}.png"
    plot.save(item.figure, png_path, dpi=DPI, facecolor="white")
    plot.save(item.figure, folder / f"{item.name}.svg", facecolor="white")
    png = png_path.read_bytes()
    w, h = struct.unpack(">II", png[16:24])  # the IHDR chunk
    return Rendered(item, png, round(w * 96 / DPI), round(h * 96 / DPI))


def _esc(value: object) -> str:
    return html.escape("" if value is None or (isinstance(value, float) and pd.isna(value)) else str(value))


def _inline_code(text: str) -> str:
    """Escape ``text``; render `backticks` as <code>."""
    parts = _esc(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_NUMBER = re.compile(r"^[+-]?(\d[\d,]*\.?\d*|\.\d+)(e[+-]?\d+)?( / \d+)?$")


def _numeric(column: pd.Series) -> bool:
    """Whether every non-empty cell reads as a number (such columns are right-aligned)."""
    cells = [str(v) for v in column if not (v is None or (isinstance(v, float) and pd.isna(v))) and str(v) != ""]
    return bool(cells) and all(_NUMBER.match(c) for c in cells)


def table_html(item: TableItem) -> str:
    frame = item.display if item.display is not None else item.frame
    shown = frame.head(item.max_rows)
    hi = item.highlight.reindex(frame.index).fillna(False).to_numpy() if item.highlight is not None else None
    numeric = [_numeric(shown[c]) for c in shown.columns]
    align = [' class="n"' if n else "" for n in numeric]
    head = "".join(f"<th{a}>{_esc(c)}</th>" for c, a in zip(shown.columns, align, strict=True))
    body = []
    for i, row in enumerate(shown.itertuples(index=False)):
        cls = ' class="hi"' if hi is not None and hi[i] else ""
        body.append(f"<tr{cls}>" + "".join(f"<td{a}>{_esc(v)}</td>" for v, a in zip(row, align, strict=True)) + "</tr>")
    more = f" Showing {len(shown)} of {len(frame)} rows." if len(frame) > len(shown) else ""
    return (
        f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'
        f'<p class="caption">{_inline_code(item.caption)}{more} '
        f'(<a href="{item.name}.csv">CSV</a>)</p>'
    )


def figure_html(r: Rendered, number: int) -> str:
    data = base64.b64encode(r.png).decode("ascii")
    name = html.escape(r.item.name)
    return (
        f'<figure id="fig-{name}"><div class="scroll"><img src="data:image/png;base64,{data}" '
        f'width="{r.width}" height="{r.height}" style="max-width: max(100%, {round(0.7 * r.width)}px)" '
        f'alt="{_esc(r.item.caption)}"></div>'
        f"<figcaption><b>Figure {number}.</b> {_inline_code(r.item.caption)} "
        f'(<a href="figures/{name}.png">PNG</a>, <a href="figures/{name}.svg">SVG</a>)</figcaption></figure>'
    )


def page_html(title: str, meta: str, sections: list[Section], rendered: dict[str, Rendered]) -> str:
    nav = "".join(f'<a href="#{html.escape(s.id)}">{_esc(s.title)}</a>' for s in sections)
    parts, number = [], 0
    for s in sections:
        parts.append(f'<section id="{html.escape(s.id)}"><h2>{_esc(s.title)}</h2>')
        if s.intro:
            parts.append(f"<p>{_inline_code(s.intro)}</p>")
        for item in s.items:
            if isinstance(item, FigureItem):
                number += 1
                parts.append(figure_html(rendered[item.name], number))
            else:
                parts.append(table_html(item))
        parts.append("</section>")
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head><body>"
        f'<header><h1>{_esc(title)}</h1><p class="meta">{_inline_code(meta)}</p><nav>{nav}</nav></header>'
        f"<main>{''.join(parts)}</main></body></html>\n"
    )


def summary_markdown(title: str, meta: str, sections: list[Section], files: list[str]) -> str:
    lines = [f"# {title}", "", meta, ""]
    for s in sections:
        body = [line for line in s.summary if line is not None]
        if any(body):
            lines += [f"## {s.title}", "", *body, ""]
    lines += ["## Files", "", "Open `index.html` in a browser (it needs no server or network).", ""]
    lines += [f"- `{f}`" for f in files]
    return "\n".join(lines) + "\n"
