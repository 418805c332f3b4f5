"""The SMART on FHIR companion app at /smart/app: the kidney picture behind the kidney-risk card.
A clinician launches it from Epic; the launch, session and OAuth modules read the patient's FHIR
data, `picture` assembles it with the very code the card uses (hooks/_kidney.py,
hooks/_prescribing.py), `chart` draws eGFR and urine ACR over time as server-side SVG, and
templates/smart_app.html renders the page (no script, strict Content-Security-Policy).
"""
