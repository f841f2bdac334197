"""Evaluation: metrics, reports, benchmarks, plots."""
