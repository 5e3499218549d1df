"""Benchmarks that print tables: `python -m fat_mlflow.benchmarks.{features,training,serving}`."""
