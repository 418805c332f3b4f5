"""Kidney function arithmetic shared by the services: CKD-EPI 2021 eGFR and KDIGO categories.

Pure functions; inputs outside the equations' domain give None, never an exception.
"""

from __future__ import annotations

# CKD-EPI 2021 creatinine equation, without race (Inker LA, et al. N Engl J Med.
# 2021;385:1737-1749. doi:10.1056/NEJMoa2102953):
#   eGFR = 142 × min(Scr/κ, 1)^α × max(Scr/κ, 1)^-1.200 × 0.9938^age × 1.012 [female]
#   κ = 0.7 (female) / 0.9 (male); α = -0.241 (female) / -0.302 (male); Scr in mg/dL.
_KAPPA = {True: 0.7, False: 0.9}
_ALPHA = {True: -0.241, False: -0.302}

# KDIGO 2024 GFR categories (mL/min/1.73 m²): lower bound → (category, description).
G_CATEGORIES = (
    (90, "G1", "normal or high"),
    (60, "G2", "mildly decreased"),
    (45, "G3a", "mildly to moderately decreased"),
    (30, "G3b", "moderately to severely decreased"),
    (15, "G4", "severely decreased"),
    (0, "G5", "kidney failure"),
)
# KDIGO 2024 albuminuria categories by urine ACR (mg/g): A1 < 30, A2 30-300, A3 > 300.
A_CATEGORIES = {
    "A1": "normal to mildly increased",
    "A2": "moderately increased",
    "A3": "severely increased",
}


def ckd_epi_2021(creatinine_mg_dl: float, age_years: float, female: bool) -> float | None:
    """eGFR (mL/min/1.73 m²) from serum creatinine; None outside adult, positive inputs."""
    if not (creatinine_mg_dl > 0 and 18 <= age_years <= 120):
        return None
    ratio = creatinine_mg_dl / _KAPPA[female]
    egfr = (142 * min(ratio, 1.0) ** _ALPHA[female] * max(ratio, 1.0) ** -1.200
            * 0.9938 ** age_years)
    return egfr * 1.012 if female else egfr


def g_category(egfr: float) -> tuple[str, str]:
    for lower, category, text in G_CATEGORIES:
        if egfr >= lower:
            return category, text
    return G_CATEGORIES[-1][1:]


def a_category(uacr_mg_g: float) -> tuple[str, str]:
    category = "A3" if uacr_mg_g > 300 else "A2" if uacr_mg_g >= 30 else "A1"
    return category, A_CATEGORIES[category]
