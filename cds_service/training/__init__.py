"""Offline data work for models, never run in a worker:

- the Bulk FHIR export (`bulk_export`, its steps in `export_request`, `export_http`,
  `export_status`, `export_files`, `export_medications` and `export_state`, and `smart_auth`;
  `cds-service data export`);
- the synthetic cohort (`cohort`, its steps in `cohort_population`, `cohort_outcome`,
  `cohort_fhir` and `cohort_defects`; `cds-service models generate-cohort`);
- a time-to-event cohort from a real export (`export_cohort`, reading `export_store`, dating
  each patient's events with `timeline`, written by `export_cohort_output`;
  `cds-service models cohort`);
- training and export of a model (`training`; `cds-service models train`) and its validation
  with bootstrap intervals (`evaluation` on the measures in `measures`, the report in
  `validation_report`).

The one exception is `export_settings`, the site file's `bulk_export:` section, which is
validated with the rest of the site file at start-up."""
