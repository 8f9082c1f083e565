"""Metric writers, host-side evaluators and the run report."""
