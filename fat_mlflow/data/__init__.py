"""Audio in, FAT2019 tables and log-mel features out: decoding (`audio`), the dataset layout,
its validation and fingerprint (`layout`), the log-mel cache (`features`), and the ESC-50 demo
dataset (`esc50`, `demo`, with its clip list `esc50_demo_clips.txt`). It imports only the
top-level utilities, and neither MLflow nor torch: reading a dataset needs no tracking store
and no network.
"""
