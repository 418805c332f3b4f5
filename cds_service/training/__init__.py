"""Offline data work for models, never run in a worker: the Bulk FHIR export (`bulk_export`, its
steps in `export_request`, `export_http`, `export_status`, `export_files`, `export_medications`
and `export_state`, and `smart_auth`; `cds-service data export`), the synthetic cohort (`cohort`,
its steps in `cohort_population`, `cohort_outcome`, `cohort_fhir` and `cohort_defects`;
`cds-service models generate-cohort`) and training, evaluation and export of a model
(`training`; `cds-service models train`), and a model's validation on a cohort with
bootstrap intervals (`evaluation` on the measures in `measures`; the report in
`validation_report`). The one exception is `export_settings`, the site
file's `bulk_export:` section, which is validated with the rest of the site file at start-up."""
