"""Micro-benchmarks of the service's hot paths (`python -m bench.<name>`); see each module."""
