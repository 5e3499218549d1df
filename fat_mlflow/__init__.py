"""fat-mlflow: the FAT2019 8th-place warm-up pipeline with SpecMix, as an MLflow project."""

__version__ = "0.1.0"
