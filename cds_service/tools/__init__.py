"""Tools people run by hand, through the `cds-service` command (`cds_service.cli`): `invoke` plays
the EHR for one call from a FHIR Bundle; `sandbox` is the /sandbox page (its `templates/` and
`static/` beside it) that shows a clinician's view for a patient you choose."""
