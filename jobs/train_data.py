"""The train job's input: Ray Data reads and decodes the class's rows; a worker holds them or streams them.

Both modes read the same way: only the selected rows (an `id` filter that Ray pushes into the parquet
read, so other rows' images are skipped by row group where the statistics allow) and only the `id` and
image columns, decoded and resized by Ray Data CPU tasks, not in the training workers. Rows that fail
to decode reach the workers as errors: they are left out and listed by id (skipped_rows).

- data_mode=memory: every worker receives every selected row and holds the class as one tensor; each
  step's slice is cut from a shared permutation, bit-identical to single-process `fit` with the seed.
- data_mode=stream: the rows are split across workers (every row to exactly one worker, per epoch), each
  worker trains on its share as it arrives, mixed in a shuffle buffer seeded by (seed, epoch, rank):
  memory grows with the buffer, not the class. Each step is still exactly the step one process takes on
  the union of the workers' local batches (gradcon_core/training/parallel.py streamed_batches); which rows meet
  in a step is Ray Data's choice (which blocks reach which worker), so two runs need not take the same
  steps. log_batches=true writes each step's ids (batches/epoch-E-rank-R.json under the run).
- data_mode=auto: stream when the class's decoded training images would take more than STREAM_ABOVE_BYTES
  in a worker (float32), memory below.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import torch

from gradcon_core.data.images import decode_images
from gradcon_core.data.imageset import IMAGE, image_bytes
from gradcon_core.files import write_bytes

DATA_MODES = ("auto", "memory", "stream")
STREAM_ABOVE_BYTES = 1 << 30  # auto: a class whose float32 images pass 1 GiB per worker is streamed
SHUFFLE_BUFFER_BATCHES = 8  # stream mode mixes rows within this many local batches


def resolve_data_mode(mode: str, rows: int, channels: int, size: tuple[int, int]) -> str:
    """memory or stream: `mode` itself, or auto's choice for the class's rows (one of DATA_MODES)."""
    if mode != "auto":
        return mode
    return "stream" if rows * channels * size[0] * size[1] * 4 > STREAM_ABOVE_BYTES else "memory"


def decoded_rows(files: list[str], fs: pafs.FileSystem, ids: list, channels: int, size: tuple[int, int],
                 anomaly_ids: list | tuple = ()):
    """A Ray Dataset of the rows with these ids: id, pixels (uint8 [H, W, C]), error ("" if none), anomaly."""
    import ray.data
    from ray.data.expressions import col

    return (ray.data.read_parquet(files, filesystem=fs).select_columns(["id", IMAGE])
            .filter(expr=col("id").is_in(list(ids)))
            .map_batches(_decode, batch_format="pyarrow",
                         fn_kwargs={"channels": channels, "size": size, "anomalies": frozenset(anomaly_ids)}))


def _decode(batch: pa.Table, channels: int, size: tuple[int, int], anomalies: frozenset) -> dict[str, np.ndarray]:
    pixels, errors = decode_images(image_bytes(batch.column(IMAGE)), channels, size)
    ids = batch.column("id").to_pylist()
    # "" for no error: a column of Nones would reach the workers as NaNs.
    return {"id": np.asarray(ids, dtype=object), "pixels": pixels, "error": np.asarray([e or "" for e in errors]),
            "anomaly": np.asarray([i in anomalies for i in ids], dtype=bool)}


def as_images(pixels: np.ndarray) -> torch.Tensor:
    """uint8 [N, H, W, C] -> float [N, C, H, W] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(pixels)).permute(0, 3, 1, 2).float().div_(255)


def held_rows(shard, parts: dict[str, list], channels: int, size: tuple[int, int],
              skipped: set) -> dict[str, torch.Tensor]:
    """Memory mode: for each part (name -> ids), its rows in that order as one tensor, read in one pass over
    the shard; rows that failed are added to skipped."""
    places: dict[Any, list[tuple[str, int]]] = {}  # id -> (part, position) for each part that lists it
    for part, ids in parts.items():
        for k, i in enumerate(ids):
            places.setdefault(i, []).append((part, k))
    found = {part: np.full(len(ids), False) for part, ids in parts.items()}
    pixels = {part: np.zeros((len(ids), *size, channels), np.uint8) for part, ids in parts.items()}
    for batch in shard.iter_batches(batch_format="numpy", batch_size=4096):
        for k, (i, err) in enumerate(zip(batch["id"].tolist(), batch["error"])):
            if err and i in places:
                skipped.add(i)
                continue
            for part, pos in places.get(i, ()):
                pixels[part][pos], found[part][pos] = batch["pixels"][k], True
    return {part: as_images(pixels[part][found[part]]) for part in parts}


class StreamedShard:
    """Stream mode: one worker's share of the train and validation rows, read again every epoch."""

    def __init__(self, train, val, batch_size: int, rank: int, world: int, seed: int, skipped: set,
                 log: BatchLog | None = None):
        self.train_shard, self.val_shard, self.skipped, self.log = train, val, skipped, log
        self.local_batch = len(range(rank, batch_size, world))  # the global batch's share of this rank
        self.rank, self.seed = rank, seed

    def train(self, epoch: int) -> Iterator[torch.Tensor]:
        batches = self.train_shard.iter_batches(
            batch_format="numpy", batch_size=self.local_batch, prefetch_batches=2,
            local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * self.local_batch,
            local_shuffle_seed=(self.seed * 1_000_003 + epoch) * 1009 + self.rank)
        for batch in batches:
            ok = self._good(batch)
            if self.log is not None:
                self.log.add(batch["id"][ok].tolist())
            yield as_images(batch["pixels"][ok])
        if self.log is not None:
            self.log.flush(epoch)

    def train_rows(self) -> Iterator[torch.Tensor]:
        for batch in self.train_shard.iter_batches(batch_format="numpy", batch_size=256, prefetch_batches=1):
            yield as_images(batch["pixels"][self._good(batch)])

    def validation(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for batch in self.val_shard.iter_batches(batch_format="numpy", batch_size=256, prefetch_batches=1):
            ok = self._good(batch)
            yield as_images(batch["pixels"][ok]), torch.from_numpy(batch["anomaly"][ok])

    def _good(self, batch: dict[str, np.ndarray]) -> np.ndarray:
        ok = batch["error"] == ""
        self.skipped.update(batch["id"][~ok].tolist())
        return ok


class BatchLog:
    """log_batches=true: the ids of each of this worker's steps, one JSON file per epoch and rank."""

    def __init__(self, fs: pafs.FileSystem, run_path: str, rank: int):
        self.fs, self.run_path, self.rank, self.steps = fs, run_path, rank, []

    def add(self, ids: list[Any]) -> None:
        self.steps.append(ids)

    def flush(self, epoch: int) -> None:
        path = f"{self.run_path}/batches/epoch-{epoch:04d}-rank-{self.rank}.json"
        write_bytes(self.fs, path, json.dumps(self.steps).encode())
        self.steps = []


def all_rows_to_one_worker(read_ahead_mb: int | None = None):
    """Ray Train's DataConfig with streaming_split(equal=False): every row reaches exactly one worker. Ray's
    default (equal=True) drops up to N-1 rows per epoch to give workers equal counts; stream mode needs no
    equal counts (a worker that runs out joins with weight 0) and so loses no row.

    read_ahead_mb caps the object-store bytes Ray Data holds ahead of the workers (None: Ray's default, a
    share of the store). A worker keeps the store pages it has read mapped, so its RSS grows with the
    store pages the class passes through; a cap makes the store reuse fewer pages, at the cost of reading
    in step with training instead of ahead (docs/benchmarks.md)."""
    from ray.train import DataConfig

    class AllRows(DataConfig):
        def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
            output = [{} for _ in range(world_size)]
            for name, ds in datasets.items():
                ds = ds.copy(ds)
                options = self._resolve_execution_options(name)
                if read_ahead_mb is not None:
                    options.resource_limits = options.resource_limits.copy(object_store_memory=read_ahead_mb * 2**20)
                ds.context.execution_options = options
                hints = worker_node_ids if self._enable_shard_locality else None
                for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                    output[rank][name] = split
            return output

    return AllRows()
