"""A self-contained HTML report: the Markdown report as HTML plus inline SVG charts.

No external resource of any kind (the network may be closed): charts are SVG
drawn here; a few lines of inline JavaScript only mark, after layout, how many
chart elements the browser actually drew (`data-rendered`), which the
headless-Chromium test reads back.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

from loadtests.report import render_markdown, scenarios_of
from loadtests.results import GROUPS, ScenarioResult

W, H = 520, 240
PAD_L, PAD_R, PAD_T, PAD_B = 62, 12, 28, 36
COLORS = {
    "gateway": "#1f77b4",
    "catalog": "#ff7f0e",
    "payment": "#2ca02c",
    "stats": "#d62728",
    "psp_sandbox": "#9467bd",
    "postgres": "#8c564b",
    "redis": "#e377c2",
    "loadgen": "#7f7f7f",
    "p50": "#9ecae1",
    "p90": "#4292c6",
    "p99": "#08519c",
    "p99.9": "#08306b",
    "avg": "#fdae6b",
    "closed": "#1f77b4",
    "open": "#ff7f0e",
}

STYLE = """
body{font-family:system-ui,sans-serif;margin:24px;color:#222;max-width:1180px}
table{border-collapse:collapse;margin:8px 0;font-size:13px}
th,td{border:1px solid #ccc;padding:3px 7px}th{background:#f3f3f3}
td{text-align:right}td:first-child{text-align:left}
code{background:#f5f5f5;padding:1px 3px;font-size:12px}
.charts{display:flex;flex-wrap:wrap;gap:12px}
svg.chart{border:1px solid #ddd;background:#fff}
svg.chart text{font-size:11px;fill:#333}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}h3{font-size:15px}
"""

SCRIPT = """
window.addEventListener("load", function () {
  var drawn = 0;
  document.querySelectorAll("svg.chart").forEach(function (svg) {
    var n = 0;
    svg.querySelectorAll(".mark").forEach(function (m) {
      var b = m.getBBox();
      if (b.width > 0 || b.height > 0) { n += 1; }
    });
    svg.setAttribute("data-rendered", String(n));
    if (n > 0) { drawn += 1; }
  });
  document.body.setAttribute("data-charts-rendered", String(drawn));
});
"""


def _nice_max(value: float) -> float:
    if value <= 0 or math.isnan(value):
        return 1.0
    exp = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 2.5, 5, 10):
        if value <= step * exp:
            return float(step * exp)
    return float(10 * exp)


def _num(value: float) -> str:
    """Axis and bar labels: 12,500 rather than 1.25e+04."""
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def _el(tag: str, text: str | None = None, /, **attrs: object) -> str:
    """One SVG element; attribute names use _ for - (class_ for class)."""
    shown = " ".join(
        f'{k.rstrip("_").replace("_", "-")}="{html.escape(str(v))}"' for k, v in attrs.items()
    )
    if text is None:
        return f"<{tag} {shown}/>"
    return f"<{tag} {shown}>{html.escape(text)}</{tag}>"


def _frame(
    title: str, kind: str, y_max: float, y_label: str, x_label: str, x_max: float
) -> list[str]:
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    bottom = PAD_T + plot_h
    out = [
        f'<svg class="chart" data-kind="{kind}" xmlns="http://www.w3.org/2000/svg" '
        f'width="{W}" height="{H}" viewBox="0 0 {W} {H}" role="img" '
        f'aria-label="{html.escape(title)}">',
        _el("text", title, x=W / 2, y=16, text_anchor="middle", font_weight="bold"),
        _el("line", x1=PAD_L, y1=bottom, x2=W - PAD_R, y2=bottom, stroke="#999"),
        _el("line", x1=PAD_L, y1=PAD_T, x2=PAD_L, y2=bottom, stroke="#999"),
    ]
    for i in range(5):
        y = round(bottom - plot_h * i / 4, 1)
        out.append(_el("line", x1=PAD_L, y1=y, x2=W - PAD_R, y2=y, stroke="#eee"))
        out.append(_el("text", _num(y_max * i / 4), x=PAD_L - 4, y=y + 4, text_anchor="end"))
    middle = PAD_T + plot_h / 2
    out.append(
        _el(
            "text",
            y_label,
            x=12,
            y=middle,
            transform=f"rotate(-90 12 {middle})",
            text_anchor="middle",
        )
    )
    if x_label:
        out.append(_el("text", x_label, x=PAD_L + plot_w / 2, y=H - 6, text_anchor="middle"))
        out.append(_el("text", _num(x_max), x=W - PAD_R, y=bottom + 14, text_anchor="end"))
        out.append(_el("text", "0", x=PAD_L, y=bottom + 14, text_anchor="start"))
    return out


def line_chart(
    title: str,
    series: Mapping[str, Sequence[Sequence[float]]],
    *,
    y_label: str,
    x_label: str = "seconds",
) -> str:
    """One polyline per named series of (x, y) points, with a legend."""
    points = [p for rows in series.values() for p in rows]
    if not points:
        return ""
    x_max = max(max(p[0] for p in points), 1.0)
    y_max = _nice_max(max(p[1] for p in points))
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    out = _frame(title, "line", y_max, y_label, x_label, x_max)
    for n, (name, rows) in enumerate(series.items()):
        if not rows:
            continue
        color = COLORS.get(name, f"hsl({n * 67 % 360},60%,45%)")
        xy = [
            (
                round(PAD_L + plot_w * p[0] / x_max, 1),
                round(PAD_T + plot_h - plot_h * p[1] / y_max, 1),
            )
            for p in rows
        ]
        if len(xy) == 1:
            out.append(
                _el(
                    "circle",
                    class_="mark",
                    data_series=name,
                    cx=xy[0][0],
                    cy=xy[0][1],
                    r=3,
                    fill=color,
                )
            )
        else:
            out.append(
                _el(
                    "polyline",
                    class_="mark",
                    data_series=name,
                    fill="none",
                    stroke=color,
                    stroke_width=1.6,
                    points=" ".join(f"{x},{y}" for x, y in xy),
                )
            )
        lx = PAD_L + 8 + (n % 4) * 110
        ly = PAD_T + 10 + (n // 4) * 13
        out.append(_el("rect", x=lx, y=ly - 8, width=10, height=3, fill=color))
        out.append(_el("text", name, x=lx + 14, y=ly - 3))
    out.append("</svg>")
    return "\n".join(out)


def bar_chart(title: str, bars: Sequence[tuple[str, float]], *, y_label: str) -> str:
    """Vertical bars with their values printed above."""
    shown = [(label, v) for label, v in bars if v is not None and not math.isnan(v)]
    if not shown:
        return ""
    y_max = _nice_max(max(v for _, v in shown))
    plot_w, plot_h = W - PAD_L - PAD_R, H - PAD_T - PAD_B
    out = _frame(title, "bar", y_max, y_label, "", 0)
    slot = plot_w / len(shown)
    for i, (label, value) in enumerate(shown):
        h = plot_h * value / y_max
        x = round(PAD_L + i * slot + slot * 0.15, 1)
        y = round(PAD_T + plot_h - h, 1)
        centre = round(x + slot * 0.35, 1)
        out.append(
            _el(
                "rect",
                class_="mark",
                data_label=label,
                x=x,
                y=y,
                width=round(slot * 0.7, 1),
                height=round(max(h, 0.5), 1),
                fill=COLORS.get(label, "#4292c6"),
            )
        )
        out.append(_el("text", _num(value), x=centre, y=y - 3, text_anchor="middle"))
        out.append(_el("text", label, x=centre, y=PAD_T + plot_h + 14, text_anchor="middle"))
    out.append("</svg>")
    return "\n".join(out)


def scenario_charts(r: ScenarioResult) -> str:
    """Latency percentiles, requests/s over time, RSS and CPU per process group over time."""
    lat = [(k, r.median.get(f"{k}_ms")) for k in ("avg", "p50", "p90", "p99", "p99.9")]
    charts = [
        bar_chart(
            f"{r.key}: latency (ms)", [(k, float(v)) for k, v in lat if v is not None], y_label="ms"
        ),
        line_chart(f"{r.key}: requests/s over time", {r.model: r.timeline}, y_label="requests/s"),
    ]
    groups = [g for g in GROUPS if g in r.resources] + sorted(set(r.resources) - set(GROUPS))
    rss = {g: [[row[0], row[1]] for row in r.resources[g].get("series", [])] for g in groups}
    cpu = {g: [[row[0], row[2]] for row in r.resources[g].get("series", [])] for g in groups}
    charts.append(line_chart(f"{r.key}: RSS per process group", rss, y_label="MB"))
    charts.append(line_chart(f"{r.key}: CPU per process group", cpu, y_label="% of one core"))
    return '<div class="charts">' + "\n".join(c for c in charts if c) + "</div>"


def _inline(text: str) -> str:
    text = html.escape(text)
    text = re.sub(r"`([^`]+)`", r"<code>\1</code>", text)
    return re.sub(r"\*\*([^*]+)\*\*", r"<strong>\1</strong>", text)


def markdown_to_html(md: str) -> str:
    """The subset render_markdown writes: headings, paragraphs, lists, pipe tables."""
    out: list[str] = []
    lines = md.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{_inline(line[level:].strip())}</h{level}>")
        elif line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                rows.append(lines[i])
                i += 1
            cells = [[c.strip() for c in row.strip("|").split("|")] for row in rows]
            body = [c for c in cells[1:] if not all(set(x) <= set("-:") for x in c)]
            out.append(
                "<table><tr>" + "".join(f"<th>{_inline(c)}</th>" for c in cells[0]) + "</tr>"
            )
            out += [
                "<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in body
            ]
            out.append("</table>")
            continue
        elif line.startswith("- "):
            items = []
            while i < len(lines) and lines[i].startswith("- "):
                items.append(f"<li>{_inline(lines[i][2:])}</li>")
                i += 1
            out.append("<ul>" + "".join(items) + "</ul>")
            continue
        elif line.strip():
            out.append(f"<p>{_inline(line)}</p>")
        i += 1
    return "\n".join(out)


def render_html(report: dict[str, Any]) -> str:
    """The report page: charts per scenario first, then the full Markdown report."""
    results = [r for r in scenarios_of(report) if r.status == "ok"]
    sections = [
        f"<h2>{html.escape(r.key)} — {html.escape(r.title)}</h2>{scenario_charts(r)}"
        for r in results
    ]
    overview = bar_chart(
        "Requests/s by scenario (median)",
        [(r.key, float(r.median.get("rps") or 0.0)) for r in results],
        y_label="requests/s",
    )
    title = f"shopstack load test — {report['started_at']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
        f"{markdown_to_html(render_markdown(report))}\n<h2>Charts</h2>\n"
        f'<div class="charts">{overview}</div>\n'
        + "\n".join(sections)
        + f"\n<script>{SCRIPT}</script>\n</body></html>\n"
    )
