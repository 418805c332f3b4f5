"""The SMART app's SVG charts (cds_service/smart/chart.py): served under `style-src 'self'`, so no
style attribute or element, no script; every text escaped; 0, 1, many and same-day points."""

from __future__ import annotations

import re
from datetime import date, timedelta

import pytest

from cds_service.smart.chart import egfr_chart, uacr_chart
from cds_service.smart.picture import EgfrPoint, UacrPoint

TODAY = date(2030, 6, 15)  # any day: every date below is relative to it


def e(days_ago, value, comparator=None, calculated=False):
    return EgfrPoint(TODAY - timedelta(days=days_ago), value, comparator, calculated,
                     "creatinine 2.00 mg/dL" if calculated else None, "G4")


def u(days_ago, value, comparator=None):
    return UacrPoint(TODAY - timedelta(days=days_ago), value, comparator, "A2")


def markers(svg: str) -> list[str]:
    return re.findall(r'<(?:circle|rect) class="marker[^"]*"[^>]*>', svg)


def y_of(marker: str) -> float:
    found = re.search(r'\bcy="([\d.]+)"', marker)
    if found:
        return float(found.group(1))
    return float(re.search(r'\by="([\d.]+)"', marker).group(1)) + 4


def test_egfr_chart_describes_itself_in_words():
    points = [e(900, 48), e(400, 41), e(10, 27)]
    svg = egfr_chart(points)
    first, last = (TODAY - timedelta(days=900)).isoformat(), (TODAY - timedelta(days=10))
    assert 'role="img"' in svg
    assert 'aria-labelledby="egfr-chart-title egfr-chart-desc"' in svg
    assert '<title id="egfr-chart-title">eGFR over time</title>' in svg
    assert (f'<desc id="egfr-chart-desc">eGFR from 48 on {first} to 27 on {last.isoformat()}, '
            "3 results.</desc>") in svg
    assert len(markers(svg)) == 3


def test_the_g_bands_are_labelled():
    svg = egfr_chart([e(10, 27)])
    # KDIGO 2024 G categories, each a drawn band with its label; "<" escaped inside SVG text.
    for label in ("G1 ≥90", "G2 60–89", "G3a 45–59", "G3b 30–44", "G4 15–29", "G5 &lt;15"):
        assert f">{label}</text>" in svg
    assert svg.count('<rect class="band"') == 6


def test_egfr_axis_is_linear():
    svg = egfr_chart([e(30, 30), e(20, 60), e(10, 90)])
    y30, y60, y90 = (y_of(m) for m in markers(svg))
    assert y30 > y60 > y90
    assert (y30 - y60) == pytest.approx(y60 - y90, abs=0.2)


def test_a_bound_is_an_open_marker_and_a_calculated_egfr_a_square():
    svg = egfr_chart([e(30, 15, comparator="<"), e(20, 27, calculated=True), e(10, 28)])
    bound, calculated, reported = markers(svg)
    assert "marker-bound" in bound and 'fill="#ffffff"' in bound
    assert calculated.startswith("<rect") and "marker-calculated" in calculated
    assert reported.startswith("<circle") and "marker-bound" not in reported
    assert 'fill="#ffffff"' not in reported
    assert "reported eGFR &lt; 15</title>" in svg
    assert "calculated eGFR 27</title>" in svg


def test_uacr_chart_is_logarithmic_with_the_a_bands():
    svg = uacr_chart([u(30, 3), u(20, 30), u(10, 300)])
    for label in ("A1 &lt;30", "A2 30–300", "A3 &gt;300"):
        assert f">{label}</text>" in svg
    y3, y30, y300 = (y_of(m) for m in markers(svg))
    # A log axis: 3 → 30 and 30 → 300 are the same distance (one decade each).
    assert (y3 - y30) == pytest.approx(y30 - y300, abs=0.2)
    assert "Urine ACR from 3 mg/g on" in svg and "to 300 mg/g on" in svg
    assert "log scale" in svg


def test_no_points_says_no_results():
    for svg in (egfr_chart([]), uacr_chart([])):
        assert ">No results</text>" in svg
        assert "no results.</desc>" in svg
        assert markers(svg) == []


def test_one_point_and_points_on_the_same_day():
    one = egfr_chart([e(5, 40)])
    assert len(markers(one)) == 1 and "<polyline" not in one
    same = egfr_chart([e(5, 40), e(5, 42, calculated=True), e(5, 40)])
    assert len(markers(same)) == 3
    assert "nan" not in same.lower() and "inf" not in same.lower()
    assert "1 result." in one


def test_dates_by_year_over_years_and_by_month_over_months():
    years = egfr_chart([e(365 * 5, 50), e(0, 30)])
    assert f">{TODAY.year}</text>" in years and f">{TODAY.year - 4}</text>" in years
    months = egfr_chart([e(150, 50), e(0, 30)])
    assert re.search(r">\d{4}-\d{2}</text>", months)
    assert not re.search(r">\d{4}</text>", months)


def test_a_thousand_points_render():
    points = [e(1000 - i, 10 + i % 80, comparator="<" if i % 97 == 0 else None,
                calculated=i % 3 == 0) for i in range(1000)]
    svg = egfr_chart(points)
    assert len(markers(svg)) == 1000
    assert "1000 results." in svg
    svg = uacr_chart([u(1000 - i, 1 + i) for i in range(1000)])
    assert len(markers(svg)) == 1000


@pytest.mark.parametrize("draw", [egfr_chart, uacr_chart])
def test_no_style_no_script_and_escaped_ids(draw):
    points = [e(30, 15, comparator="<"), e(10, 28)] if draw is egfr_chart else [u(10, 45)]
    svg = draw(points, chart_id='x"><script>')
    assert "style=" not in svg and "<style" not in svg
    assert "<script" not in svg
    assert 'aria-labelledby="x&#34;&gt;&lt;script&gt;-title' in svg
