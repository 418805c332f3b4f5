"""The SMART on FHIR companion app (issue 19)."""
