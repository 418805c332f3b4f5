"""eGFR and urine ACR over time as server-side SVG: no script, no CDN, no style attribute (the page
is served with `style-src 'self'`): presentation attributes and classes of smart_app.css only.

Bands are the KDIGO 2024 categories (docs/clinical.md, "Categories and thresholds"), each drawn
and labelled, so no category is told by colour alone. A result reported as a bound ("<15") is an
open marker; an eGFR we calculated from creatinine (CKD-EPI 2021) is a square, a reported one a
circle. Every text is escaped; the work is one pass over the points.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import date, timedelta
from typing import Any

from markupsafe import Markup, escape

from hooks._kidney import COMPARATOR_TEXT

WIDTH, HEIGHT = 640, 280
LEFT, RIGHT, TOP, BOTTOM = 48, 92, 12, 30

# KDIGO 2024 GFR categories (mL/min/1.73 m²): (label, low, high) on the chart's linear axis.
G_BANDS = (("G1 ≥90", 90, None), ("G2 60–89", 60, 90), ("G3a 45–59", 45, 60),
           ("G3b 30–44", 30, 45), ("G4 15–29", 15, 30), ("G5 <15", 0, 15))
# KDIGO 2024 albuminuria categories by urine ACR (mg/g): A1 < 30, A2 30–300, A3 > 300.
A_BANDS = (("A1 <30", None, 30), ("A2 30–300", 30, 300), ("A3 >300", 300, None))
# Band fills, lightest for the best category; greys enough to tell apart in print.
_FILLS = ("#f4f7fb", "#e8eef6", "#dce5f0", "#cfdbea", "#c2d0e3", "#b5c6dd")


def egfr_chart(points: Sequence[Any], *, width: int = WIDTH, height: int = HEIGHT,
               chart_id: str = "egfr-chart") -> Markup:
    """eGFR (mL/min/1.73 m²) over time on a linear axis with the G bands. `points`: objects
    with `date`, `value`, `comparator` and `calculated` (picture.EgfrPoint), oldest first."""
    top = max([120.0, *(p.value * 1.1 for p in points)])
    frame = _Frame(width, height, points, lambda v: v / top)
    bands = [(label, low / top, 1.0 if high is None else high / top)
             for label, low, high in G_BANDS]
    markers = [_line(frame, points)]
    markers += [_marker(frame, p, square=p.calculated,
                       what=f"{'calculated' if p.calculated else 'reported'} eGFR "
                            f"{COMPARATOR_TEXT[p.comparator]}{p.value:g}")
               for p in points]
    ticks = [(v / top, f"{v}") for v in range(0, int(top) + 1, 30)]
    return _svg(frame, chart_id, "eGFR over time",
                _describe("eGFR", "", points), bands, ticks, markers,
                "eGFR, mL/min/1.73 m²")


def uacr_chart(points: Sequence[Any], *, width: int = WIDTH, height: int = HEIGHT,
               chart_id: str = "uacr-chart") -> Markup:
    """Urine ACR (mg/g) over time on a log axis with the A bands. `points`: objects with
    `date`, `value` (mg/g) and `comparator` (picture.UacrPoint), oldest first."""
    values = [p.value for p in points if p.value > 0]
    low = math.floor(math.log10(min([3.0, *values])))
    high = math.ceil(math.log10(max([3000.0, *values])))

    def scale(v: float) -> float:
        return (math.log10(max(v, 10.0 ** low)) - low) / (high - low)

    frame = _Frame(width, height, points, scale)
    bands = [(label, 0.0 if lo is None else scale(lo), 1.0 if hi is None else scale(hi))
             for label, lo, hi in A_BANDS]
    markers = [_line(frame, points)]
    markers += [_marker(frame, p, square=False,
                       what=f"urine ACR {COMPARATOR_TEXT[p.comparator]}{_n(p.value)} mg/g")
               for p in points]
    ticks = [(scale(10.0 ** e), _n(10.0 ** e)) for e in range(low, high + 1)]
    return _svg(frame, chart_id, "Urine albumin/creatinine ratio over time",
                _describe("Urine ACR", " mg/g", points), bands, ticks, markers,
                "urine ACR, mg/g (log scale)")


def _n(value: float) -> str:
    return f"{value:.0f}" if value >= 1 else f"{value:g}"


class _Frame:
    """Pixel positions: dates across, scaled values (0..1) up."""

    def __init__(self, width: int, height: int, points: Sequence[Any], scale: Any):
        self.width, self.height, self.scale = width, height, scale
        days = [p.date for p in points]
        self.empty = not days
        first = last = date(2000, 1, 1)  # no points: the frame is drawn without dates
        if days:
            first, last = min(days), max(days)
        if (last - first).days < 60:  # one point, or all on a few days: a readable window
            first, last = first - timedelta(days=30), last + timedelta(days=30)
        self.first, self.span = first, (last - first).days
        self.plot_w = width - LEFT - RIGHT
        self.plot_h = height - TOP - BOTTOM

    def x(self, day: date) -> float:
        return LEFT + (day - self.first).days / self.span * self.plot_w

    def y(self, fraction: float) -> float:
        return TOP + (1 - min(max(fraction, 0.0), 1.0)) * self.plot_h

    def last(self) -> date:
        return self.first + timedelta(days=self.span)


def _line(frame: _Frame, points: Sequence[Any]) -> str:
    """The results joined in date order, the trend at a glance (no line for fewer than two)."""
    if len(points) < 2:
        return ""
    xy = " ".join(f"{frame.x(p.date):.1f},{frame.y(frame.scale(p.value)):.1f}" for p in points)
    return (f'<polyline class="trend" points="{xy}" fill="none" stroke="#5f6b7a" '
            f'stroke-width="1"/>')


def _marker(frame: _Frame, p: Any, *, square: bool, what: str) -> str:
    x, y = frame.x(p.date), frame.y(frame.scale(p.value))
    bound = p.comparator is not None
    fill = "#ffffff" if bound else "#1d2633"
    kind = "marker marker-bound" if bound else "marker"
    tip = f"<title>{escape(p.date.isoformat())}: {escape(what)}</title>"
    if square:
        return (f'<rect class="{kind} marker-calculated" x="{x - 4:.1f}" y="{y - 4:.1f}" '
                f'width="8" height="8" fill="{fill}" stroke="#1d2633" stroke-width="1.5">'
                f"{tip}</rect>")
    return (f'<circle class="{kind}" cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{fill}" '
            f'stroke="#1d2633" stroke-width="1.5">{tip}</circle>')


def _date_ticks(frame: _Frame) -> list[tuple[date, str]]:
    """Yearly ticks over spans of more than 2 years, else every 1, 2, 3 or 6 months."""
    first, last = frame.first, frame.last()
    if frame.span > 730:
        step = max(1, math.ceil((last.year - first.year) / 8))
        return [(date(y, 1, 1), str(y)) for y in range(first.year + 1, last.year + 1, step)]
    months = frame.span / 30.4
    step = next((s for s in (1, 2, 3, 6) if months / s <= 8), 12)
    ticks, y, m = [], first.year, first.month + 1
    while True:
        if m > 12:
            y, m = y + 1, m - 12
        day = date(y, m, 1)
        if day > last:
            return ticks
        if (m - 1) % step == 0:
            ticks.append((day, f"{y}-{m:02d}"))
        m += 1


def _describe(name: str, unit: str, points: Sequence[Any]) -> str:
    if not points:
        return f"{name}: no results."
    first, last = points[0], points[-1]
    count = f"{len(points)} result{'s' if len(points) != 1 else ''}"
    if len(points) == 1:
        return f"{name} {_value(first)}{unit} on {first.date.isoformat()}, {count}."
    return (f"{name} from {_value(first)}{unit} on {first.date.isoformat()} to "
            f"{_value(last)}{unit} on {last.date.isoformat()}, {count}.")


def _value(p: Any) -> str:
    return f"{COMPARATOR_TEXT[p.comparator]}{p.value:g}"


def _svg(frame: _Frame, chart_id: str, title: str, desc: str,
         bands: list[tuple[str, float, float]], ticks: list[tuple[float, str]],
         markers: list[str], axis: str) -> Markup:
    w, h, cid = frame.width, frame.height, escape(chart_id)
    right = w - RIGHT
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" '
           f'viewBox="0 0 {w} {h}" width="{w}" height="{h}" '
           f'aria-labelledby="{cid}-title {cid}-desc">',
           f'<title id="{cid}-title">{escape(title)}</title>',
           f'<desc id="{cid}-desc">{escape(desc)}</desc>']
    for index, (label, low, high) in enumerate(bands):
        y_top, y_bottom = frame.y(high), frame.y(low)
        out.append(f'<rect class="band" x="{LEFT}" y="{y_top:.1f}" width="{frame.plot_w}" '
                   f'height="{y_bottom - y_top:.1f}" fill="{_FILLS[index % len(_FILLS)]}" '
                   f'stroke="#9aa8ba" stroke-width="0.5"/>')
        out.append(f'<text class="band-label" x="{right + 6}" y="{(y_top + y_bottom) / 2 + 4:.1f}"'
                   f' font-size="11" fill="#1d2633">{escape(label)}</text>')
    for fraction, label in ticks:
        y = frame.y(fraction)
        out.append(f'<text class="tick" x="{LEFT - 6}" y="{y + 4:.1f}" font-size="11" '
                   f'text-anchor="end" fill="#1d2633">{escape(label)}</text>')
    base = TOP + frame.plot_h
    for day, label in [] if frame.empty else _date_ticks(frame):
        x = frame.x(day)
        out.append(f'<line x1="{x:.1f}" y1="{base}" x2="{x:.1f}" y2="{base + 4}" '
                   f'stroke="#1d2633"/>')
        out.append(f'<text class="tick" x="{x:.1f}" y="{base + 16}" font-size="11" '
                   f'text-anchor="middle" fill="#1d2633">{escape(label)}</text>')
    out.append(f'<line x1="{LEFT}" y1="{base}" x2="{right}" y2="{base}" stroke="#1d2633"/>')
    out.append(f'<text class="axis-label" x="{LEFT}" y="{h - 2}" font-size="11" '
               f'fill="#5f6b7a">{escape(axis)}</text>')
    if len(markers) > 1:
        out.append('<g class="markers">')
        out.extend(m for m in markers if m)
        out.append("</g>")
    else:
        out.append(f'<text class="empty" x="{LEFT + frame.plot_w / 2:.1f}" '
                   f'y="{TOP + frame.plot_h / 2:.1f}" text-anchor="middle" font-size="14" '
                   f'fill="#1d2633">No results</text>')
    out.append("</svg>")
    return Markup("\n".join(out))  # noqa: S704 - every text in it was escaped above
