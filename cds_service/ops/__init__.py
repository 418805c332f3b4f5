"""Operations: what an operator runs and watches. `serving` is gunicorn as `cds-service serve`
runs it; `listeners` puts /metrics and detailed health on the ops port; `metrics` is the
Prometheus catalogue; `logs` the JSON log lines; `sitecheck` the go-live check of a site."""
