"""Charts drawn as SVG on the server: no chart library, no script, nothing fetched from
elsewhere; a phone renders them as images. The alert limits are drawn as bands (out of range
shaded), the series as one polyline of at most ``data.MAX_POINTS`` averaged points."""
from __future__ import annotations

import datetime as dt
from html import escape

W, H = 640, 180
LEFT, RIGHT, TOP, BOTTOM = 46, 10, 12, 24


def _fmt(v: float) -> str:
    return f"{v:.0f}" if abs(v) >= 100 else f"{v:.1f}"


def svg(points: list[dict], metric: str, label: str, unit: str, low: float | None,
        high: float | None, start: dt.datetime, end: dt.datetime, title: str) -> str:
    values = [p[metric] for p in points if p[metric] is not None]
    limits = [x for x in (low, high) if x is not None]
    lo_v = min(values + limits) if values or limits else 0.0
    hi_v = max(values + limits) if values or limits else 1.0
    pad = (hi_v - lo_v) * 0.08 or 1.0
    lo_v, hi_v = lo_v - pad, hi_v + pad
    span = (end - start).total_seconds() or 1.0
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def x(t: dt.datetime) -> float:
        return LEFT + pw * min(1.0, max(0.0, (t - start).total_seconds() / span))

    def y(v: float) -> float:
        return TOP + ph * (1 - (v - lo_v) / (hi_v - lo_v))

    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {W} {H}" role="img" '
             f'aria-label="{escape(title)}" class="chart">',
             f'<title>{escape(title)}</title>',
             f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="#f7faf7" stroke="#cfd8cf"/>']
    # out-of-range bands: above the high limit and below the low one
    if high is not None and high < hi_v:
        parts.append(f'<rect class="band" x="{LEFT}" y="{TOP}" width="{pw}" '
                     f'height="{max(0.0, y(high) - TOP):.1f}" fill="#f6d5d0"/>')
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(high):.1f}" y2="{y(high):.1f}" '
                     f'stroke="#c0392b" stroke-dasharray="4 3"/>')
    if low is not None and low > lo_v:
        parts.append(f'<rect class="band" x="{LEFT}" y="{y(low):.1f}" width="{pw}" '
                     f'height="{max(0.0, TOP + ph - y(low)):.1f}" fill="#f6d5d0"/>')
        parts.append(f'<line x1="{LEFT}" x2="{W - RIGHT}" y1="{y(low):.1f}" y2="{y(low):.1f}" '
                     f'stroke="#c0392b" stroke-dasharray="4 3"/>')
    for v in (lo_v + pad, hi_v - pad):
        parts.append(f'<text x="{LEFT - 4}" y="{y(v) + 4:.1f}" text-anchor="end" '
                     f'font-size="11" fill="#555">{_fmt(v)}</text>')
    parts.append(f'<text x="{LEFT}" y="{H - 6}" font-size="11" fill="#555">'
                 f'{start:%d %b %H:%M} UTC</text>')
    parts.append(f'<text x="{W - RIGHT}" y="{H - 6}" text-anchor="end" font-size="11" '
                 f'fill="#555">{end:%d %b %H:%M}</text>')
    parts.append(f'<text x="{LEFT + 6}" y="{TOP + 14}" font-size="12" fill="#333">'
                 f'{escape(label)} ({escape(unit)})</text>')
    coords = " ".join(f"{x(p['t']):.1f},{y(p[metric]):.1f}" for p in points if p[metric] is not None)
    if coords:
        parts.append(f'<polyline class="series" fill="none" stroke="#2e7d32" stroke-width="1.6" '
                     f'points="{coords}"/>')
    else:
        parts.append(f'<text x="{W / 2}" y="{H / 2}" text-anchor="middle" font-size="13" '
                     f'fill="#777">no readings in this window</text>')
    parts.append("</svg>")
    return "".join(parts)
