"""fat-mlflow: the FAT2019 8th-place warm-up pipeline with SpecMix, as an MLflow project.

The package reads like the pipeline, in layers that import only from their own layer or
below: `config`, `plots`, `locking`, `processes` and `memory` are utilities every layer may
use; `data` turns audio and FAT2019 tables into cached log-mels; `engine` trains and scores the
networks, without MLflow; `warmup` runs the four warm-up stages and the whole pipeline as
MLflow runs; `serving` turns stage runs into the registered ensemble, scores it against the
logistic floor and serves it (pyfunc model, submissions, Spark); `experiments` measures the
pipeline (ablations, study); `benchmarks` times it; `cli` is the `fat-mlflow` command on top.
tests/test_layout.py holds the package to that order.
"""

__version__ = "0.1.0"
