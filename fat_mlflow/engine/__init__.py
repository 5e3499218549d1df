"""Training and scoring of the networks: the two architectures (`models`), crops and batches
(`dataset`), SpecMix and the other batch augmentations (`augment`), number format and memory
layout (`precision`), one fold model (`training`), sliding-window inference (`predict`),
lwlrap (`metrics`), stratified folds (`folds`) and K-fold cross-validation (`crossval`, which
keeps its folds through a `FoldStore` that the warm-up layer implements on MLflow). It imports
only `data` and the top-level utilities, and never MLflow or click: it trains on a GPU
machine without a tracking store (`python -m fat_mlflow.benchmarks.fold`).
"""
