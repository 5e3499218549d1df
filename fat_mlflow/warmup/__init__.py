"""The warm-up stages and the MLflow layer they stand on: where runs keep their folds and
how later stages find them (`tracking`), the feature step (`featurize`), the noisy-clip
selection rules (`selection`), what a stage is asked and reads (`stage_inputs`), the four
stages and fold jobs (`stages`), and the whole pipeline with reuse of finished stages
(`pipeline`). It builds on `engine` and `data` and imports nothing above it: the pipeline's
ensemble step is handed to it by its caller (`serving.ensemble.build_and_register`).
"""
