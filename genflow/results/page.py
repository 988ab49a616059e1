"""The leaderboard's web page: one self-contained ``index.html`` in the run's folder.

Nothing is fetched when it is viewed: styles and the sorting script are inline, plots are inline SVG,
and the sample grids are PNG files beside the page (``grids/<entry>.png``). It shows the table (sortable
by any column: FID ± std over seed sets, Δ to the paper's figure, NFE, solver, precision, commit, and
every further metric the rows carry), a sample grid per entry, FID against NFE for entries that sweep
NFE, and each entry's FID over time from the history (records with the same settings only).
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Sequence

from genflow.results.history import settings_key

# (row key, header, digits); the metric columns appear when some row has them
COLUMNS = [("name", "entry", None), ("model", "model", None), ("settings", "settings", None),
           ("dataset", "data", None), ("nfe", "NFE", 0), ("solver", "solver", None),
           ("precision", "precision", None), ("fid", "FID ± std", 3), ("paper_fid", "paper", 2),
           ("delta_paper", "Δ paper", 3), ("kid", "KID", 5), ("fd_dinov2", "FD_DINOv2", 2),
           ("pr_precision", "P (k-NN)", 3), ("pr_recall", "R (k-NN)", 3), ("images", "images", 0),
           ("img_per_s", "img/s", 1), ("commit", "commit", None)]
OPTIONAL = {"paper_fid", "delta_paper", "kid", "fd_dinov2", "pr_precision", "pr_recall"}

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
table{border-collapse:collapse;margin:1em 0}th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:right;white-space:nowrap}
th{cursor:pointer;background:#f4f4f4;user-select:none}th[aria-sort]::after{content:" \\2195";color:#999}
th[aria-sort=ascending]::after{content:" \\2191";color:#222}th[aria-sort=descending]::after{content:" \\2193";color:#222}
td.text,th.text{text-align:left}.grids{display:flex;flex-wrap:wrap;gap:1.5em}
figure{margin:0}figure img{image-rendering:pixelated;width:192px;border:1px solid #ccc}
svg{background:#fafafa;border:1px solid #ddd;margin:0.5em 1em 0.5em 0}small{color:#666}
"""

# sorts the rows by a column's data-v (a number, or text); a second click reverses
SCRIPT = """
document.querySelectorAll('table.board th').forEach(function (th, col) {
  th.setAttribute('aria-sort', 'none');
  th.addEventListener('click', function () {
    var table = th.closest('table'), body = table.tBodies[0];
    var up = th.getAttribute('aria-sort') !== 'ascending';
    table.querySelectorAll('th').forEach(function (h) { h.setAttribute('aria-sort', 'none'); });
    th.setAttribute('aria-sort', up ? 'ascending' : 'descending');
    var rows = Array.prototype.slice.call(body.rows);
    rows.sort(function (a, b) {
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var nx = parseFloat(x), ny = parseFloat(y), d;
      if (x === '' && y === '') d = 0; else if (x === '') return 1; else if (y === '') return -1;
      else if (!isNaN(nx) && !isNaN(ny)) d = nx - ny; else d = x < y ? -1 : x > y ? 1 : 0;
      return up ? d : -d;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""


def _cell(row: dict, key: str, digits) -> str:
    value = row.get(key)
    if value is None:
        return '<td data-v=""></td>'
    if key == "fid":
        std = row.get("fid_std")
        text = f"{value:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None else "")
        return f'<td data-v="{value!r}">{html.escape(text)}</td>'
    if digits is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = f"{value:+.{digits}f}" if key == "delta_paper" else f"{value:.{digits}f}"
        return f'<td data-v="{value!r}">{text}</td>'
    text = html.escape(str(value))
    return f'<td class="text" data-v="{text}">{text}</td>'


def _plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, xticks: dict | None = None,
          width: int = 420, height: int = 260) -> str:
    """A line plot as inline SVG: one polyline with markers per named series."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return ""
    x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
    y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
    pad = (y1 - y0) * 0.1 or max(abs(y1) * 0.05, 1e-3)
    y0, y1 = y0 - pad, y1 + pad
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    left, right, top, bottom = 56, 34, 24, 40

    inset = 14  # markers and tick labels clear of the y axis labels

    def sx(x):
        return left + inset + (x - x0) / (x1 - x0) * (width - left - right - 2 * inset)

    def sy(y):
        return top + (y1 - y) / (y1 - y0) * (height - top - bottom)

    colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf"]
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img">',
             f'<text x="{width / 2}" y="15" text-anchor="middle" font-size="13">{html.escape(title)}</text>',
             f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle" font-size="11">{html.escape(xlabel)}</text>',
             f'<text x="12" y="{height / 2}" font-size="11" transform="rotate(-90 12 {height / 2})" '
             'text-anchor="middle">FID</text>']
    for frac in (0.0, 0.5, 1.0):
        y = y0 + frac * (y1 - y0)
        parts.append(f'<text x="{left - 4}" y="{sy(y) + 4:.1f}" text-anchor="end" font-size="10">{y:.3g}</text>')
    ticks = xticks or {x: f"{x:g}" for x in sorted({p[0] for p in points})}
    for x, label in ticks.items():
        parts.append(f'<text x="{sx(x):.1f}" y="{height - bottom + 14}" text-anchor="middle" font-size="10">'
                     f'{html.escape(str(label))}</text>')
    for i, (name, pts) in enumerate(series.items()):
        color = colors[i % len(colors)]
        pts = sorted(pts)
        parts.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.5" points="'
                     + " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in pts) + '"/>')
        for x, y in pts:
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}">'
                         f'<title>{html.escape(name)}: {y:.4g}</title></circle>')
        parts.append(f'<text x="{width - right}" y="{top + 12 * (i + 1)}" text-anchor="end" font-size="10" '
                     f'fill="{color}">{html.escape(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def nfe_curves(rows: Sequence[dict]) -> str:
    """FID against NFE for every sweep (rows sharing a ``sweep`` name, at two or more NFEs)."""
    sweeps: dict[str, list] = {}
    for r in rows:
        if r.get("sweep"):
            sweeps.setdefault(r["sweep"], []).append((float(r["nfe"]), float(r["fid"])))
    series = {name: pts for name, pts in sweeps.items() if len({x for x, _ in pts}) > 1}
    return _plot(series, "FID vs NFE", "NFE") if series else ""


def history_plots(rows: Sequence[dict], history: Sequence[dict]) -> list[str]:
    """Each entry's mean FID over the runs recorded with its current settings, oldest first."""
    plots = []
    for r in rows:
        record = r.get("record")
        if not record:
            continue
        same = [h for h in history if settings_key(h) == settings_key(record)]
        if len(same) < 1:
            continue
        pts = [(float(i), float(h["fid_mean"])) for i, h in enumerate(same)]
        ticks = {float(i): h["date"][:10] for i, h in enumerate(same)} if len(same) <= 6 else None
        plots.append(_plot({r["name"]: pts}, f"{r['name']}: FID over time", "run (date)", ticks))
    return plots


def write_page(out: str | Path, suite: dict, rows: Sequence[dict], history: Sequence[dict], header: dict) -> Path:
    """Write ``out/index.html`` (atomically) for ``rows`` (each with ``record``: its history record, and
    ``grid``: its sample grid's path relative to ``out``) and return its path."""
    from genflow.cache import atomic_write

    out = Path(out)
    columns = [c for c in COLUMNS if c[0] not in OPTIONAL or any(r.get(c[0]) is not None for r in rows)]
    head = "".join(f'<th class="{"text" if d is None else "num"}" data-key="{k}">{html.escape(h)}</th>'
                   for k, h, d in columns)
    body = "".join("<tr>" + "".join(_cell(r, k, d) for k, _, d in columns) + "</tr>" for r in rows)
    grids = "".join(
        f'<figure><img src="{html.escape(r["grid"])}" alt="samples of {html.escape(r["name"])}">'
        f'<figcaption>{html.escape(r["name"])} <small>(NFE {r["nfe"]}, seeds 0–{r.get("grid_count", 0) - 1})'
        '</small></figcaption></figure>' for r in rows if r.get("grid"))
    curves = nfe_curves(rows)
    over_time = "".join(history_plots(rows, history))
    meta = " · ".join(f"{html.escape(str(k))}: {html.escape(str(v))}" for k, v in header.items())
    data = json.dumps([{k: r.get(k) for k, _, _ in columns} | {"fid_std": r.get("fid_std")} for r in rows])
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>genflow leaderboard: {html.escape(suite['name'])}</title>
<link rel="icon" href="data:,"><meta name="viewport" content="width=device-width, initial-scale=1">
<style>{STYLE}</style></head><body>
<h1>FID leaderboard: {html.escape(suite['name'])}</h1>
<p><small>{meta}</small></p>
<table class="board"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>
<p><small>FID: minimum over seed sets (EDM's protocol), ± the standard deviation over sets; click a column to
sort.</small></p>
<h2>Samples</h2><div class="grids">{grids}</div>
{"<h2>FID vs NFE</h2>" + curves if curves else ""}
{"<h2>FID over time</h2>" + over_time if over_time else ""}
<script type="application/json" id="rows">{html.escape(data, quote=False)}</script>
<script>{SCRIPT}</script>
</body></html>
"""
    return atomic_write(out / "index.html", lambda tmp: tmp.write_text(page))
