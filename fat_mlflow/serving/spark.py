"""Batch scoring on Spark: the registered tagger as `mlflow.pyfunc.spark_udf` over many clips.

The result type of the UDF is the model's output signature (one float per class, `error`,
`top_labels`), so no `result_type` is given. Two sources (docs/spark.md):

- a folder: listed on the driver as `fat-mlflow predict` lists it (every audio file, empty
  ones included, so each gets its row), read by the model on the executors as `path` rows
  inside that folder, which every executor must see at the same path (a shared filesystem);
- a table (Parquet or CSV) with a `path` or `audio_base64` column and any key columns; its
  `path` rows are read only inside `--audio-root`.

The output keeps the source's columns except the audio bytes (for a folder: `fname`, `path`)
and adds one score column per class and `error` (and `top_labels` with `--top-k`), written
to Parquet:

    python -m fat_mlflow.serving.spark --clips DIR -o out.parquet [--model URI] [--master local[2]]
    python -m fat_mlflow.serving.spark --table clips.parquet --audio-root /mnt/clips -o out.parquet
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import mlflow
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from fat_mlflow.config import ServingConfig
from fat_mlflow.data.layout import DataLayoutError
from fat_mlflow.serving.submission import list_clips
from fat_mlflow.serving.tagger import (
    AUDIO_ROOT_CONFIG,
    BASE64_COLUMN,
    INPUT_COLUMNS,
    PATH_COLUMN,
    TOP_LABELS_COLUMN,
)

DEFAULT_MODEL_URI = "models:/fat2019-tagger@champion"
PREDICTION = "_prediction"


def spark_session(master: str | None = None) -> SparkSession:
    """A session whose Arrow batches hold as many clips as one model call of the CLI: the
    tagger decodes a whole batch before scoring it, so this bounds an executor's memory."""
    builder = SparkSession.builder.appName("fat-mlflow-scoring").config(
        "spark.sql.execution.arrow.maxRecordsPerBatch", str(ServingConfig.batch_clips))
    return (builder.master(master) if master else builder).getOrCreate()


def folder_clips(spark: SparkSession, folder: str) -> DataFrame:
    """Every audio file in `folder` as (fname, path) rows, in `fat-mlflow predict`'s order."""
    clips, _ = list_clips(Path(folder))
    return spark.createDataFrame(clips)


def table_clips(spark: SparkSession, table: str) -> DataFrame:
    """A Parquet or CSV table with a `path` and/or `audio_base64` column (plus any keys)."""
    source = "csv" if table.lower().endswith(".csv") else "parquet"
    clips = spark.read.format(source).option("header", "true").load(table)
    if not set(INPUT_COLUMNS) & set(clips.columns):
        raise DataLayoutError(f"{table}: needs a {PATH_COLUMN} or {BASE64_COLUMN} column, "
                              f"found {clips.columns}")
    return clips


def score_clips(spark: SparkSession, model_uri: str, clips: DataFrame,
                audio_root: str | None = None, top_k: int = 0) -> DataFrame:
    """`clips` (without its bytes) and one score column per class and `error` (and
    `top_labels` when `top_k` > 0). `audio_root` lets `path` rows be read inside it."""
    udf = mlflow.pyfunc.spark_udf(
        spark, model_uri,
        model_config={AUDIO_ROOT_CONFIG: audio_root} if audio_root else None,
        params={"top_k": top_k} if top_k else None)
    inputs = [column for column in INPUT_COLUMNS if column in clips.columns]
    keys = [column for column in clips.columns if column != BASE64_COLUMN]  # path stays
    scored = clips.withColumn(PREDICTION, udf(F.struct(*inputs)))
    outputs = [field.name for field in scored.schema[PREDICTION].dataType.fields
               if top_k or field.name != TOP_LABELS_COLUMN]
    return scored.select(*keys, *[F.col(PREDICTION)[name].alias(name) for name in outputs])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=DEFAULT_MODEL_URI, help="model URI")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--clips", help="folder of audio files on a shared filesystem")
    source.add_argument("--table", help="Parquet or CSV table with a path or audio_base64 column")
    parser.add_argument("--audio-root", default=None,
                        help="folder the model may read `path` rows from, seen by every executor "
                             "(default with --clips: that folder; with --table: none)")
    parser.add_argument("--top-k", type=int, default=0, help="also write the k best labels")
    parser.add_argument("-o", "--output", required=True, help="Parquet folder to write")
    parser.add_argument("--master", default=None,
                        help="Spark master, e.g. local[2] (default: spark-submit's or Spark's)")
    args = parser.parse_args()
    spark = spark_session(args.master)
    started = time.perf_counter()
    try:
        if args.clips:
            clips, audio_root = folder_clips(spark, args.clips), args.audio_root or args.clips
        else:
            clips, audio_root = table_clips(spark, args.table), args.audio_root
    except DataLayoutError as error:
        parser.exit(1, f"error: {error}\n")
    scored = score_clips(spark, args.model, clips, audio_root, args.top_k)
    scored.write.mode("overwrite").parquet(args.output)
    seconds = time.perf_counter() - started
    result = spark.read.parquet(args.output)
    total, failed = result.count(), result.where(F.col("error") != "").count()
    print(f"wrote {total} clips ({failed} with an error) to {Path(args.output)} in {seconds:.1f} s "
          f"({total / seconds:.2f} clips/s)")


if __name__ == "__main__":
    main()
