"""CKD-EPI 2021 and KDIGO categories against published definitions."""

from __future__ import annotations

import pytest

from hooks._kidney import a_category, ckd_epi_2021, g_category


@pytest.mark.parametrize(
    ("scr", "age", "female", "expected"),
    [
        # Worked by hand from Inker 2021 (Scr/κ above 1 → only the -1.200 term applies):
        # 142 × (1.0/0.9)^-1.2 × 0.9938^60 = 142 × 0.88123 × 0.68835 = 86.1
        (1.0, 60, False, 86.1),
        # 142 × (1.0/0.7)^-1.2 × 0.9938^60 × 1.012 = 142 × 0.65181 × 0.68835 × 1.012 = 64.5
        (1.0, 60, True, 64.5),
        # Scr/κ below 1 → only the α term:
        # 142 × (0.6/0.7)^-0.241 × 0.9938^40 × 1.012 = 142 × 1.03785 × 0.77975 × 1.012 = 116.3
        (0.6, 40, True, 116.3),
        # Advanced CKD: 142 × (3.2/0.9)^-1.2 × 0.9938^72 = 142 × 0.21824 × 0.63906 = 19.8
        (3.2, 72, False, 19.8),
    ],
    ids=["60M-1.0", "60F-1.0", "40F-0.6", "72M-3.2"],
)
def test_ckd_epi_2021(scr, age, female, expected):
    assert ckd_epi_2021(scr, age, female) == pytest.approx(expected, abs=0.1)


@pytest.mark.parametrize(("scr", "age"), [(0, 60), (-1, 60), (1.0, 17), (1.0, 121)])
def test_ckd_epi_2021_outside_its_domain_is_none(scr, age):
    assert ckd_epi_2021(scr, age, female=False) is None


@pytest.mark.parametrize(("egfr", "category"), [
    (120, "G1"), (90, "G1"), (89.9, "G2"), (60, "G2"), (59, "G3a"), (45, "G3a"), (44.9, "G3b"),
    (30, "G3b"), (29, "G4"), (15, "G4"), (14.9, "G5"), (0, "G5"), (-3, "G5"),
])
def test_g_categories(egfr, category):
    assert g_category(egfr)[0] == category


@pytest.mark.parametrize(("uacr", "category"), [
    (0, "A1"), (29.9, "A1"), (30, "A2"), (300, "A2"), (300.1, "A3"), (5000, "A3"),
])
def test_a_categories(uacr, category):
    assert a_category(uacr)[0] == category
