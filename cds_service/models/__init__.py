"""Risk models: manifests, safe artifacts, estimators, training and the per-worker registry."""
