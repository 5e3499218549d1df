"""Measurements of the pipeline, each a set of whole pipeline runs reused from the tracking
store: the quality ablations (`ablations`) and the study of test lwlrap against budget and
data (`study`), with their markdown reports and figures. It sits above `serving` (every
pipeline ends in the registered ensemble) and below `benchmarks` and `cli`.
"""
