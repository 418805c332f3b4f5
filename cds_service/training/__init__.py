"""Offline data work for models: Bulk FHIR export (`cds-service data export`), and later cohort
building and training. Nothing here is imported by the app or its workers."""
