"""The input errors a user can fix, gathered so the CLI reports them without a traceback."""
from fat_mlflow.audio import AudioError
from fat_mlflow.data import DataLayoutError
from fat_mlflow.demo import DemoExistsError
from fat_mlflow.esc50 import Esc50Error
from fat_mlflow.features import BadAudioError
from fat_mlflow.folds import FoldSplitError
from fat_mlflow.pipeline import FoldJobError
from fat_mlflow.tracking import RunLookupError

USER_ERRORS = (AudioError, DataLayoutError, BadAudioError, DemoExistsError, Esc50Error,
               FoldJobError, FoldSplitError, RunLookupError)
