"""The tagger's model code, logged as the model ("Models From Code"): loading the model runs
this file instead of unpickling an object, so it needs only the package code (code_paths) and
works across library versions."""
import mlflow

from fat_mlflow.serving.tagger import FatTagger

mlflow.models.set_model(FatTagger())
