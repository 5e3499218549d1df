"""The input errors a user can fix, gathered so the CLI reports them without a traceback."""
from fat_mlflow.data.audio import AudioError
from fat_mlflow.data.demo import DemoExistsError
from fat_mlflow.data.esc50 import Esc50Error
from fat_mlflow.data.features import BadAudioError
from fat_mlflow.data.layout import DataLayoutError
from fat_mlflow.engine.folds import FoldSplitError
from fat_mlflow.warmup.pipeline import FoldJobError
from fat_mlflow.warmup.tracking import RunLookupError

USER_ERRORS = (AudioError, DataLayoutError, BadAudioError, DemoExistsError, Esc50Error,
               FoldJobError, FoldSplitError, RunLookupError)
