"""Batch-score a parquet image set with a trained detector into a result table (a pool of Ray actors).

gradcon score checkpoint=CKPT input=PREFIX output=PREFIX [concurrency=1] [gpus_per_actor=0] [batch_size=N]
              [threshold=T | contamination=C] [address=ADDRESS]

Pipeline: a pool of scoring actors starts (the detector loads once per actor) while the driver reads the input
files' footers (in parallel) and makes one task per row group whose result is missing or stale; the driver hands
the tasks out a few row groups at a time, and each actor reads its row groups straight from storage (local or
S3), decodes, scores and writes each row group's result file itself, the stages overlapped
(gradcon_core/results/row_groups.py). Every result row is written once, by the actor that scored it: no image
crosses Ray's object store, no result row reaches the driver, which only counts rows and stage timings. A
re-run of the same command skips the row groups whose result is complete and scores the rest, so a job killed
halfway and started again ends complete, with no duplicate rows (gradcon_core/results/files.py).
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import psutil
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import S3Options, check_readable, filesystem_for
from gradcon_core import load_detector
from gradcon_core.config import bounded, local_path
from gradcon_core.data.images import ImageError, shape_of
from gradcon_core.data.imageset import IMAGE, check_image_set, image_bytes, list_parquet_files, row_groups
from gradcon_core.detectors.contract import Detector
from gradcon_core.files import write_bytes
from gradcon_core.results.files import (
    RowGroupTask,
    apply_contamination,
    input_identity,
    recorded_identity,
    result_identity,
    result_name,
)
from gradcon_core.results.row_groups import STAGES, RowGroupScorer
from gradcon_core.training.checkpoint import checkpoint_id, locate
from jobs.progress import Progress
from jobs.tracking import JobSettings, config_params, start_run

IMPORTED_AT = time.time()  # when this module (and with it torch) finished importing in this process
RENAMED = {"model": "checkpoint"}  # the flag of the release before -> its key
FOOTER_THREADS = 16  # footers and result files' metadata read at once (on S3 each is a request or two)
ROWS_PER_CALL = 4096  # an actor call takes row groups up to about this many rows (one, if it is larger)
CALLS_IN_FLIGHT = 2  # per actor: the next call waits at the actor while it works on the current one
ACTOR_RESTARTS = 3  # a scoring actor whose process dies is restarted, and its call retried, this many times
# When a scoring actor's process started (a worker Ray had started before is older than the job), finished its
# imports (torch's among them), entered and left __init__ (the checkpoint loaded).
ACTOR_TIMES = ("actor_process", "actor_imported", "actor_init_start", "actor_ready")


@dataclass
class ScoreConfig(JobSettings):
    checkpoint: str = local_path("")  # a checkpoint folder, or a run's folder (its best checkpoint); local or s3://
    input: str = local_path("")  # image set: a parquet file or a prefix of many
    output: str = local_path("")  # result table prefix (local or s3://)
    batch_size: int | None = bounded(None, at_least=1)  # rows scored at once; None: the detector's (memory-sized)
    concurrency: int | None = bounded(None, at_least=1)  # scoring actors; None: as many as the cluster fits
    gpus_per_actor: float = bounded(0.0, at_least=0)
    cpus_per_actor: float = bounded(1.0, above=0)
    decode_threads: int | None = bounded(None, at_least=1)  # per actor; None: its CPUs, or the node's with a GPU
    threshold: float | None = None  # default: the checkpoint's threshold
    contamination: float | None = None  # instead: the (1 - c) quantile of this run's scores
    address: str | None = None  # Ray cluster; default RAY_ADDRESS, else an embedded local Ray
    s3_endpoint: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if not (self.checkpoint and self.input and self.output):
            raise ValueError("score needs checkpoint=, input= and output=")
        if self.threshold is not None and self.contamination is not None:
            raise ValueError("give threshold= or contamination=, not both")


Config = ScoreConfig


@dataclass
class ScorePlan:
    """What a score run reads, writes and scores with: decided, and checked, before Ray starts."""

    checkpoint: str  # the checkpoint folder (where checkpoint= named a run: its best checkpoint)
    detector: Detector
    model_id: str  # content hash of the checkpoint
    threshold: float | None  # None: contamination= sets it once every row is scored
    tasks: list[RowGroupTask]  # every row group of the input, in order
    todo: list[RowGroupTask]  # those whose result is missing or stale
    out_fs: pafs.FileSystem
    out_root: str
    seconds: float  # the planning's

    @property
    def outputs(self) -> list[str]:
        return [t.output for t in self.tasks]


def run(cfg: ScoreConfig) -> dict:
    start = time.time()
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    for uri in (cfg.checkpoint, cfg.input):
        check_readable(uri, options)
    in_fs, in_path = filesystem_for(cfg.input, options)
    in_fs, files = list_parquet_files(in_path, in_fs)
    with ScoringPool(cfg, options, most=len(files)) as pool:  # the actors start (on Ray) while the driver plans
        plan = plan_score(cfg, options, in_fs, in_path, files)
        todo_rows = sum(t.rows for t in plan.todo)
        print(f"scoring {todo_rows} rows in {len(plan.todo)} row group(s) ({len(plan.tasks) - len(plan.todo)} "
              f"already complete) with model {plan.model_id}", file=sys.stderr)
        timings: dict = {}
        if plan.todo:
            with Progress(todo_rows, unit="rows", label="scoring", quiet=cfg.quiet) as progress:
                timings = pool.score(plan, progress, start)
    summary = summarize(cfg, plan, time.time() - start, timings)
    write_bytes(plan.out_fs, f"{plan.out_root}/_summary.json", json.dumps(summary, indent=1).encode())
    # Tracked once the table is complete (a re-run of the same output continues the same MLflow run).
    with start_run(cfg.tracking, f"score-{os.path.basename(plan.out_root.rstrip('/'))}") as tracker:
        tracker.log_params(config_params(cfg))
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float)})
        tracker.log_text(json.dumps(summary, indent=1), "_summary.json")
        tracker.set_checkpoint(plan.checkpoint)
    print(f"rows {summary['rows']}  errors {summary['errors']}  anomalies {summary['anomalies']}  "
          f"threshold {summary['threshold']:.6g}  wall {summary['seconds']:.1f} s  {summary['images_per_s']} images/s")
    print(f"results: {cfg.output}")
    return summary


def plan_score(cfg: ScoreConfig, options: S3Options, in_fs: pafs.FileSystem, in_path: str,
               files: list[str]) -> ScorePlan:
    start = time.time()
    checkpoint = locate(cfg.checkpoint, filesystem_for(cfg.checkpoint, options)[0])
    model_fs, model_path = filesystem_for(checkpoint, options)
    detector = load_detector(model_path, model_fs)
    model_id = checkpoint_id(model_path, model_fs)
    threshold = cfg.threshold if cfg.threshold is not None else detector.threshold_
    if threshold is None and cfg.contamination is None:
        raise ValueError(f"{cfg.checkpoint} stores no threshold: give threshold= or contamination=")
    if cfg.contamination is not None:
        threshold = None
    check_image_set(in_path, in_fs)
    out_fs, out_root = filesystem_for(cfg.output, options)
    out_fs.create_dir(out_root, recursive=True)
    _check_output_outside_input(cfg, in_fs, in_path, out_fs, out_root, files)
    tasks = _tasks(in_fs, files, out_root, model_id, threshold, cfg.contamination)
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:  # on S3: a request or two per result file, at once
        found = list(pool.map(lambda t: recorded_identity(out_fs, t.output), tasks))
    todo = [t for t, f in zip(tasks, found) if f != (json.loads(t.identity), t.rows)]
    _remove_stale(out_fs, out_root, tasks, {os.path.basename(f) for f in files})
    _check_input_shape(detector, in_fs, sorted({t.input for t in todo}) or files)
    return ScorePlan(checkpoint, detector, model_id, threshold, tasks, todo, out_fs, out_root, time.time() - start)


def _tasks(in_fs: pafs.FileSystem, files: list[str], out_root: str, model_id: str, threshold: float | None,
           contamination: float | None) -> list[RowGroupTask]:
    """A task per row group of every file, from the footers (read once each, at once)."""
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        groups = list(pool.map(lambda f: row_groups(in_fs, [f]), files))
        sources = list(pool.map(lambda f: input_identity(in_fs, f), files))
    names = [os.path.basename(f) for f in files]
    if len(set(names)) != len(names):
        raise ValueError("the input has files with the same name in different folders")
    tasks = []
    for path, file_groups, source in zip(files, groups, sources):
        file_groups = file_groups or [(path, 0, 0, 0, 0)]  # a file of no row groups: an empty result file
        for path, group, first_row, rows, _ in file_groups:
            identity = result_identity(model_id, threshold, contamination, source, group)
            tasks.append(RowGroupTask(path, group, first_row, rows,
                                      f"{out_root}/{result_name(path, group, len(file_groups))}",
                                      json.dumps(identity, sort_keys=True)))
    return tasks


def _remove_stale(fs: pafs.FileSystem, out_root: str, tasks: list[RowGroupTask], inputs: set[str]) -> None:
    """Result files of this input that this run does not write (the input's row groups changed), what an older
    release left (its `_parts` folder) and half-written local files: gone, so the table holds no stale row."""
    expected = {t.output for t in tasks}
    for info in fs.get_file_info(pafs.FileSelector(out_root)):
        if info.base_name == "_parts" and info.type == pafs.FileType.Directory:
            fs.delete_dir(info.path)
        elif info.path.endswith(".parquet.partial"):
            fs.delete_file(info.path)
        elif info.path.endswith(".parquet") and info.path not in expected:
            found = recorded_identity(fs, info.path)  # (a file that is not ours raises: it is never touched)
            if found and found[0]["input"]["name"] in inputs:
                fs.delete_file(info.path)


class ScoringPool:
    """ScoringActors on Ray (`concurrency`, else as many as the cluster fits, at most `most`: one per input file),
    started when the pool is entered (so that they start while the driver plans), each kept busy with calls of a
    few row groups until every task is done, and stopped on the way out.

    Ray restarts an actor whose process died and retries its call there (max_restarts, max_task_retries); a
    row group is written atomically, so a retried call leaves no duplicate. Plain Ray actors rather than Ray
    Data's actor pool: on a warm Ray a Ray Data pool took 2.3-2.7 s to reach its first actor's __init__ where a
    Ray actor takes a fraction of a second (docs/benchmarks.md), and the driver only hands out row groups."""

    def __init__(self, cfg: ScoreConfig, options: S3Options, most: int):
        self.cfg, self.options, self.most, self.actors = cfg, options, max(1, most), []

    def __enter__(self) -> ScoringPool:
        import ray

        from cluster.ray_init import data_logs, init_ray

        cfg = self.cfg
        init_ray(cfg.address, min_cpus=(cfg.concurrency or 1) * cfg.cpus_per_actor)  # embedded: for _check_fits
        concurrency = cfg.concurrency or min(capacity(ray.cluster_resources(), cfg), self.most)
        _check_fits(ray.cluster_resources(), cfg, concurrency)
        data_logs(cfg.verbose)
        self.started = time.time()
        actor = ray.remote(ScoringActor).options(**actor_resources(cfg), max_restarts=ACTOR_RESTARTS,
                                                 max_task_retries=ACTOR_RESTARTS)
        self.actors = [actor.remote(cfg.checkpoint, self.options, cfg.input, cfg.output, cfg.batch_size,
                                    decode_threads(cfg)) for _ in range(concurrency)]
        return self

    def __exit__(self, *exc) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor)

    def score(self, plan: ScorePlan, progress: Progress, start: float) -> dict:
        """Every task of the plan, on the actors; the stages' seconds and the start-up's parts (start: when the job
        started, time.time(), as every time here: the actors' clocks are the same machines')."""
        import ray

        size = calls_of(plan.todo, len(self.actors))
        calls = deque(plan.todo[k:k + size] for k in range(0, len(plan.todo), size))
        running, done, first = {}, [], None
        for actor in self.actors * CALLS_IN_FLIGHT:  # an actor's next call waits at it while it scores
            if calls:
                running[actor.score.remote(calls.popleft())] = actor
        while running:
            (ref,), _ = ray.wait(list(running), num_returns=1)
            actor = running.pop(ref)
            summaries = ray.get(ref)
            first = first or time.time()
            done.append(summaries)
            progress.update(int(pc.sum(summaries.column("rows")).as_py()))
            if calls:
                running[actor.score.remote(calls.popleft())] = actor
        table = pa.concat_tables(done)
        if pc.sum(table.column("rows")).as_py() != sum(t.rows for t in plan.todo):
            raise RuntimeError("not every row group was scored once: run the same command again")
        return timing_summary(table, plan.seconds, self.started, first, start)


def calls_of(tasks: list[RowGroupTask], actors: int) -> int:
    """Row groups per call: small ones go a few at a time (a call costs milliseconds), but every actor gets
    several calls, so that results reach the driver as they are written and the last call is short."""
    return max(1, min(math.ceil(len(tasks) / (4 * actors)), ROWS_PER_CALL // max(1, min(t.rows for t in tasks))))


def timing_summary(table: pa.Table, plan_s: float, started: float, first: float, start: float) -> dict:
    """Where the time went: each stage's seconds summed over the row groups (overlapping stages: they add up to
    more than the wall time), and the start-up: planning, and the first actor's way to its first results from
    when the pool started it (its process, if Ray had none waiting; its imports; __init__; its first call)."""
    first_actor = pc.index(table.column("actor_ready"), pc.min(table.column("actor_ready"))).as_py()
    process, imported, init, ready = (table.column(c)[first_actor].as_py() for c in ACTOR_TIMES)
    return {"stages_s": {s: round(pc.sum(table.column(f"{s}_s")).as_py(), 2) for s in STAGES},
            "first_results_s": round(first - start, 2),
            "startup_s": {"plan": round(plan_s, 2), "to_process": round(max(process, started) - started, 2),
                          "imports": round(imported - max(process, started), 2),
                          "to_actor": round(init - imported, 2), "actor_init": round(ready - init, 2),
                          "first_call": round(first - ready, 2)}}


class ScoringActor:
    """One detector per actor (loaded once), scoring the row groups of each call into their result files; returns
    each row group's counts and stage seconds, and the times of this actor's start (ACTOR_TIMES: its process,
    its imports, its __init__ and the end of that)."""

    def __init__(self, checkpoint: str, options: S3Options, input: str, output: str, batch_size: int | None,
                 threads: int | None):
        from cluster.ray_init import size_torch_threads

        self.init_start = time.time()
        size_torch_threads()
        fs, _ = filesystem_for(checkpoint, options)
        located = locate(checkpoint, fs)
        detector = load_detector(filesystem_for(located, options)[1], filesystem_for(located, options)[0])
        self.scorer = RowGroupScorer(detector, filesystem_for(input, options)[0], filesystem_for(output, options)[0],
                                     batch_size, threads or os.cpu_count())
        self.times = (psutil.Process().create_time(), IMPORTED_AT, self.init_start, time.time())

    def score(self, tasks: list[RowGroupTask]) -> pa.Table:
        summaries = pa.Table.from_pylist(self.scorer.score(tasks))
        for name, value in zip(ACTOR_TIMES, self.times):
            summaries = summaries.append_column(name, pa.array([value] * summaries.num_rows, pa.float64()))
        return summaries


def decode_threads(cfg: ScoreConfig) -> int | None:
    """Each actor's decode threads: the setting, else its CPUs; None for a GPU actor, which takes its node's
    CPUs (the JPEG and PNG decoders release the GIL, and a GPU scores faster than a few cores decode)."""
    if cfg.decode_threads:
        return cfg.decode_threads
    return None if cfg.gpus_per_actor > 0 else max(1, int(cfg.cpus_per_actor))


def actor_resources(cfg: ScoreConfig) -> dict[str, float]:
    """A scoring actor's Ray resources."""
    return {"num_cpus": cfg.cpus_per_actor, "num_gpus": cfg.gpus_per_actor}


def summarize(cfg: ScoreConfig, plan: ScorePlan, wall: float, timings: dict) -> dict:
    """The run's summary (_summary.json), from the complete result table; contamination= sets the threshold."""
    threshold = plan.threshold
    if cfg.contamination is not None:
        threshold = apply_contamination(plan.out_fs, plan.outputs, cfg.contamination)
    results = pq.read_table(plan.outputs, columns=["error", "is_anomaly"], filesystem=plan.out_fs)
    scored = sum(t.rows for t in plan.todo)
    return {"rows": results.num_rows, "errors": results.num_rows - results.column("error").null_count,
            "anomalies": int(pc.sum(results.column("is_anomaly")).as_py() or 0), "threshold": threshold,
            "scored_now": scored, "seconds": round(wall, 2), "images_per_s": round(scored / wall, 1),
            # Start-up (planning; the first actor's process, imports and checkpoint; its first call), then each
            # stage's seconds over every row group.
            "first_results_s": timings.get("first_results_s"), "startup_s": timings.get("startup_s"),
            "stages_s": timings.get("stages_s"), "row_groups": len(plan.tasks),
            "objects_written": len(plan.todo) + 1,  # a result file per row group scored, and this summary
            "model_id": plan.model_id, "output": cfg.output}


def _check_input_shape(detector: Detector, fs: pafs.FileSystem, files: list[str]) -> None:
    """A whole input of the wrong kind (RGB set, grayscale model) is a mistake: say so before starting. Images of
    another size are resized to the model's: say that once, from the first image that decodes."""
    for path in files:
        for batch in pq.ParquetFile(path, filesystem=fs).iter_batches(batch_size=64, columns=[IMAGE]):
            for data in image_bytes(batch.column(IMAGE)):
                try:
                    height, width, channels = shape_of(data)
                except ImageError:
                    continue
                if channels != detector.channels:
                    raise ValueError(f"the model takes {detector.channels}-channel images but "
                                     f"{path} holds {channels}-channel ones")
                model_h, model_w = detector.input_size
                if (height, width) != (model_h, model_w):
                    print(f"note: the model takes {model_h}x{model_w} images; the input's ({height}x{width} in "
                          f"{os.path.basename(path)}) are resized to that when decoded (Lanczos, aspect ratio not "
                          "kept)", file=sys.stderr)
                return


def capacity(resources: dict, cfg: ScoreConfig) -> int:
    """The actors this cluster fits: by its CPUs, and by its GPUs for GPU actors (at least one)."""
    fits = resources.get("CPU", 0) / cfg.cpus_per_actor
    if cfg.gpus_per_actor > 0:
        fits = min(fits, resources.get("GPU", 0) / cfg.gpus_per_actor)
    return max(1, math.floor(fits + 1e-9))


def _check_fits(resources: dict, cfg: ScoreConfig, concurrency: int) -> None:
    """An actor pool larger than the cluster would wait forever for the actors it cannot place."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if concurrency * cfg.cpus_per_actor > cpus:
        raise ValueError(f"{concurrency} scoring actor(s) x {cfg.cpus_per_actor} CPU do not fit this cluster "
                         f"({cpus:g} CPUs): lower concurrency= or cpus_per_actor=")
    if concurrency * cfg.gpus_per_actor > gpus:
        raise ValueError(f"{concurrency} actor(s) x {cfg.gpus_per_actor} GPU > the cluster's {gpus:g} GPU(s)")


def _check_output_outside_input(cfg: ScoreConfig, in_fs: pafs.FileSystem, in_path: str, out_fs: pafs.FileSystem,
                                out_root: str, files: list[str]) -> None:
    """Results written into the image set would become part of it (the next read takes them for images), or
    overwrite its files."""
    if type(in_fs) is not type(out_fs):
        return
    inside = os.path.normpath(out_root) + "/"
    outputs = {f"{out_root}/{os.path.basename(f)}" for f in files}
    if inside.startswith(os.path.normpath(in_path) + "/") or outputs & set(files):
        raise ValueError(f"output={cfg.output} is the input image set or inside it ({cfg.input}): "
                         "write the results somewhere else")
