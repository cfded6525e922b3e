"""The self-contained HTML report: one file, no network, every figure embedded, every text from data escaped.

What keeps it safe to open, whatever the identity names, labels, notes or paths in the run hold:

- every piece of text from data goes through :func:`html.escape` (with quotes, so attribute values too);
- figures are ``<img>`` elements with ``data:`` URIs (an SVG shown through ``<img>`` runs no script);
- a Content-Security-Policy allows no network at all, images only from ``data:``, and only the report's own
  inline style and script, by hash: markup that slipped through escaping still could not run a script.

Tables sort by clicking a column header (numbers by value, an interval by its estimate); each table links its
CSV as a ``data:`` download.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cloakbench.reports.render import Table, format_number, sort_key, to_csv

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;margin:0;color:#1b1b1b;
background:#fff}
header,main,nav{max-width:1200px;margin:0 auto;padding:0 20px}
header{padding-top:18px;border-bottom:1px solid #ddd}
h1{font-size:1.5em;margin:0 0 4px}h2{font-size:1.2em;margin:28px 0 8px;border-bottom:1px solid #eee}
h3{font-size:1.05em;margin:22px 0 4px}
.muted{color:#555}.caption{color:#444;margin:2px 0 8px;max-width:80em}
nav ul{list-style:none;padding:0;display:flex;flex-wrap:wrap;gap:4px 14px;margin:10px 0}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:12.5px;margin:4px 0 6px}
th,td{padding:3px 8px;border-bottom:1px solid #e4e4e4;text-align:left;white-space:nowrap}
td.num{text-align:right;font-variant-numeric:tabular-nums}
th{background:#f4f6f8;cursor:pointer;user-select:none;position:sticky;top:0}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
tbody tr:hover{background:#f7fbff}
figure{margin:10px 0 22px}figure img{width:100%;max-width:1000px;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:13px;max-width:80em}
pre{background:#f6f8fa;padding:10px;overflow:auto;font-size:12px;max-height:32em}
dl{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px}dt{color:#555}dd{margin:0}
a.csv{font-size:12px}
"""

_JS = """
document.querySelectorAll("table.sortable").forEach(function (table) {
  var heads = table.querySelectorAll("thead th");
  heads.forEach(function (th, col) {
    th.addEventListener("click", function () {
      var asc = th.getAttribute("aria-sort") !== "ascending";
      heads.forEach(function (h) { h.removeAttribute("aria-sort"); });
      th.setAttribute("aria-sort", asc ? "ascending" : "descending");
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      rows.sort(function (a, b) {
        var x = a.cells[col], y = b.cells[col];
        var nx = x.getAttribute("data-sort"), ny = y.getAttribute("data-sort");
        var c;
        if (nx !== null && ny !== null) { c = parseFloat(nx) - parseFloat(ny); }
        else if (nx !== null) { c = -1; } else if (ny !== null) { c = 1; }
        else { c = x.textContent.localeCompare(y.textContent); }
        return asc ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
"""


def _csp_hash(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii") + "'"


CONTENT_SECURITY_POLICY = (
    f"default-src 'none'; img-src data:; style-src {_csp_hash(_CSS)}; script-src {_csp_hash(_JS)}; "
    "base-uri 'none'; form-action 'none'"
)


@dataclass(frozen=True, kw_only=True)
class EmbeddedFigure:
    """A figure for the page: its anchor name, title, caption and image bytes with their MIME type."""

    name: str
    title: str
    caption: str
    mime: str
    data: bytes


def escape(value: Any) -> str:
    return html.escape(str(value), quote=True)


def table_html(table: Table) -> str:
    head = "".join(f'<th scope="col">{escape(c.header)}</th>' for c in table.columns)
    body = []
    for row in table.rows:
        cells = []
        for c in table.columns:
            value = row.get(c.key)
            key = sort_key(value)
            attrs = f' class="num" data-sort="{key!r}"' if key is not None else ""
            cells.append(f"<td{attrs}>{escape(format_number(value, c))}</td>")
        body.append("<tr>" + "".join(cells) + "</tr>")
    csv_uri = "data:text/csv;charset=utf-8;base64," + base64.b64encode(to_csv(table).encode("utf-8")).decode("ascii")
    return (
        f'<section id="table-{escape(table.name)}"><h3>{escape(table.title)}</h3>'
        f'<p class="caption">{escape(table.caption)} '
        f'<a class="csv" download="{escape(table.name)}.csv" href="{csv_uri}">CSV</a></p>'
        f'<div class="scroll"><table class="sortable"><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(body)}</tbody></table></div></section>"
    )


def figure_html(figure: EmbeddedFigure) -> str:
    uri = f"data:{figure.mime};base64," + base64.b64encode(figure.data).decode("ascii")
    return (
        f'<figure id="figure-{escape(figure.name)}"><h3>{escape(figure.title)}</h3>'
        f'<img src="{uri}" alt="{escape(figure.title)}">'
        f"<figcaption>{escape(figure.caption)}</figcaption></figure>"
    )


def _facts(items: Sequence[tuple[str, Any]]) -> str:
    return "<dl>" + "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in items) + "</dl>"


def report_html(
    *, title: str, description: str, facts: Sequence[tuple[str, Any]], tables: Sequence[Table],
    figures: Sequence[EmbeddedFigure], suite_yaml: str, attempts: Sequence[Mapping[str, Any]],
) -> str:  # fmt: skip
    """The whole page as one string (pure)."""
    nav = (
        ["<li><a href='#run'>Run</a></li>"]
        + [f'<li><a href="#table-{escape(t.name)}">{escape(t.title)}</a></li>' for t in tables]
        + [f'<li><a href="#figure-{escape(f.name)}">{escape(f.title)}</a></li>' for f in figures]
        + ["<li><a href='#suite'>Suite</a></li>", "<li><a href='#metadata'>Metadata</a></li>"]
    )
    attempt_rows = "".join(
        "<tr>"
        + "".join(
            f"<td>{escape(a.get(k, ''))}</td>"
            for k in ("id", "started_utc", "finished_utc", "status", "executor", "host")
        )
        + f"<td>{escape((a.get('metadata') or {}).get('device', ''))}</td>"
        + f"<td>{escape(((a.get('metadata') or {}).get('git') or {}).get('commit', ''))}</td></tr>"
        for a in attempts
    )
    attempts_table = (
        '<div class="scroll"><table><thead><tr><th>attempt</th><th>started (UTC)</th><th>finished (UTC)</th>'
        "<th>status</th><th>executor</th><th>host</th><th>device</th><th>git commit</th></tr></thead>"
        f"<tbody>{attempt_rows}</tbody></table></div>"
    )
    metadata = json.dumps([a.get("metadata") for a in attempts], indent=1, sort_keys=True, default=str)
    return "".join(
        [
            "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>",
            f'<meta http-equiv="Content-Security-Policy" content="{escape(CONTENT_SECURITY_POLICY)}">',
            "<meta name='viewport' content='width=device-width, initial-scale=1'>",
            f"<title>{escape(title)}</title><style>{_CSS}</style></head><body>",
            f"<header><h1>{escape(title)}</h1><p class='muted'>{escape(description)}</p></header>",
            f"<nav><ul>{''.join(nav)}</ul></nav><main>",
            f"<section id='run'><h2>Run</h2>{_facts(facts)}{attempts_table}</section>",
            "<section id='tables'><h2>Tables</h2>",
            *(table_html(t) for t in tables),
            "</section><section id='figures'><h2>Figures</h2>",
            *(figure_html(f) for f in figures),
            "</section>",
            f"<section id='suite'><h2>Suite</h2><pre>{escape(suite_yaml)}</pre></section>",
            f"<section id='metadata'><h2>Metadata of each attempt</h2><pre>{escape(metadata)}</pre></section>",
            f"</main><script>{_JS}</script></body></html>\n",
        ]
    )
