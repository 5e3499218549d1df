"""From stage runs to a model people can call: the ensemble registered as one pyfunc model
(`ensemble`), the logistic floor it is scored against (`baseline`), the pyfunc model itself
(`tagger`, logged from the code file `tagger_model`), Kaggle submissions (`submission`) and
batch scoring on Spark (`spark`). It may import `warmup`, `engine`, `data` and the top-level
utilities; nothing here imports `experiments`, `benchmarks` or `cli`. A logged tagger
carries a copy of the whole package as its code (`tagger.PACKAGE_DIR`), so it loads in a
fresh process whatever package is installed there.
"""
