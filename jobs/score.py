"""Batch-score a parquet image set with a trained detector into a result table (Ray Data).

gradcon score checkpoint=CKPT input=PREFIX output=PREFIX [batch_size=256] [concurrency=1] [gpus_per_actor=0]
              [decode=auto|actor|tasks] [threshold=T | contamination=C] [address=ADDRESS]

Pipeline: read the input files' row groups in CPU tasks (local or S3, many files; each row keeps its file and
row number) -> [decode=tasks: decode and resize in CPU tasks] -> score (and decode, unless done) in an actor
pool (the detector and its reference gradients load once per actor), each actor writing the result rows it
scored as pieces of its input files -> one joining actor joins each input file's pieces, in row order, into
one output file of the same name, as soon as its last row is scored (gradcon_core/results/files.py).
Neither images nor result rows reach the driver, which only counts rows. A re-run of the same command skips
inputs whose output is complete and scores the rest again, so a job killed halfway and started again ends
complete, with no duplicate rows.
A rewritten file has the same rows, ids, errors and flags as a clean run's; its scores can differ in the
last bits (about 1e-8): the batched scorer's sums depend on which rows share a batch, and batches span files.
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from cluster.storage import S3Options, check_readable, filesystem_for
from gradcon_core import load_detector
from gradcon_core.config import bounded, local_path
from gradcon_core.data.images import ImageError, shape_of
from gradcon_core.data.imageset import IMAGE, RowGroup, check_image_set, image_bytes, list_parquet_files, row_groups
from gradcon_core.detectors.contract import Detector
from gradcon_core.files import write_bytes
from gradcon_core.results.files import (
    ROW,
    apply_contamination,
    clear_pieces,
    input_identity,
    is_complete,
    join_pieces,
    remove_parts_folder,
    result_identity,
    write_piece,
)
from gradcon_core.results.table import (
    DECODE_ERROR,
    PASSTHROUGH,
    PIXELS,
    decoded_columns,
    pixel_result_rows,
    pixels_of,
    result_rows,
)
from gradcon_core.training.checkpoint import checkpoint_id, locate
from jobs.progress import Progress
from jobs.tracking import JobSettings, config_params, start_run

# Ray Data's file listing and parquet reads are tasks of one CPU each: leave room for them.
READ_CPUS = 1.0
# Where images are decoded and resized. "actor": in the scoring actor, before it scores (one process per
# actor decodes; no pixels cross processes). "tasks": in a Ray Data CPU stage beside the reads, over every
# free CPU of the cluster, the actors receiving uint8 pixels: a GPU actor scores far faster than one
# process decodes. "auto": tasks when the actors have GPUs, else actor (measured on CPU: docs/benchmarks.md).
DECODE_WHERE = ("auto", "actor", "tasks")


RENAMED = {"model": "checkpoint"}  # the flag of the release before -> its key


@dataclass
class ScoreConfig(JobSettings):
    checkpoint: str = local_path("")  # a checkpoint folder, or a run's folder (its best checkpoint); local or s3://
    input: str = local_path("")  # image set: a parquet file or a prefix of many
    output: str = local_path("")  # result table prefix (local or s3://)
    batch_size: int = bounded(256, at_least=1)
    concurrency: int = bounded(1, at_least=1)  # scoring actors
    gpus_per_actor: float = bounded(0.0, at_least=0)
    cpus_per_actor: float = bounded(1.0, above=0)
    block_mb: float = bounded(2.0, above=0)  # read block size: one block goes to one actor; small blocks spread work
    decode: str = "auto"  # actor | tasks | auto (tasks when the actors have GPUs): see DECODE_WHERE
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
        if self.decode not in DECODE_WHERE:
            raise ValueError(f"config decode: must be one of {', '.join(DECODE_WHERE)}, got {self.decode!r}")


Config = ScoreConfig


class Scorer:
    """Ray Data callable class: scores batches with one detector per actor (decoding them first unless the decode
    stage has: then the batch has PIXELS and DECODE_ERROR in place of the images) and writes the result rows
    as pieces of their input files; returns only how many rows of which file it wrote."""

    def __init__(self, checkpoint: str, options: S3Options, threshold: float | None, model_id: str, output: str):
        fs, path = filesystem_for(checkpoint, options)
        self.detector = load_detector(path, fs)
        self.threshold, self.model_id = threshold, model_id
        self.out_fs, self.out_root = filesystem_for(output, options)

    def __call__(self, batch: pa.Table) -> pa.Table:
        names = batch.schema.names
        ids = batch.column("id").to_pylist()
        passthrough = {c: batch.column(c) for c in PASSTHROUGH if c in names}
        det = self.detector
        if PIXELS in names:
            pixels = pixels_of(batch.column(PIXELS), det.channels, tuple(det.input_size))
            rows = pixel_result_rows(det, ids, pixels, batch.column(DECODE_ERROR).to_pylist(), self.threshold,
                                     self.model_id, passthrough)
        else:
            rows = result_rows(det, ids, image_bytes(batch.column(IMAGE)), self.threshold, self.model_id, passthrough)
        rows = rows.append_column(ROW, batch.column(ROW))
        paths, counts = batch.column("path"), {}
        for path in pc.unique(paths).to_pylist():
            piece = rows.filter(pc.equal(paths, path))
            write_piece(self.out_fs, self.out_root, os.path.basename(path), piece)
            counts[path] = piece.num_rows
        return pa.table({"path": list(counts), "rows": list(counts.values())})


def decode_stage(batch: pa.Table, channels: int, size: tuple[int, int]) -> pa.Table:
    """decode=tasks: a Ray Data CPU task's work, the images of a batch decoded and resized to the model's size."""
    decoded = decoded_columns(image_bytes(batch.column(IMAGE)), channels, size)
    batch = batch.drop_columns([IMAGE])
    for name, column in decoded.items():
        batch = batch.append_column(name, column)
    return batch


def actor_resources(cfg: ScoreConfig) -> dict[str, float]:
    """A scoring actor's Ray resources. Ray Data gives a map worker that names no CPUs one CPU, with a GPU or
    without, and warns that naming both CPUs and GPUs is "experimental" (Ray 2.60): so one CPU goes unnamed."""
    resources = {"num_gpus": cfg.gpus_per_actor}
    if cfg.cpus_per_actor != 1:
        resources["num_cpus"] = cfg.cpus_per_actor
    return resources


def decodes_in_tasks(cfg: ScoreConfig) -> bool:
    return cfg.decode == "tasks" or (cfg.decode == "auto" and cfg.gpus_per_actor > 0)


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


def _check_fits(resources: dict, cfg: ScoreConfig) -> None:
    """An actor pool that takes every CPU leaves none for the reads: Ray Data then waits forever."""
    cpus, gpus = resources.get("CPU", 0), resources.get("GPU", 0)
    if cfg.concurrency * cfg.cpus_per_actor + READ_CPUS > cpus:
        raise ValueError(f"{cfg.concurrency} scoring actor(s) x {cfg.cpus_per_actor} CPU leave no CPU for reading "
                         f"on this cluster ({cpus:g} CPUs): lower concurrency= or cpus_per_actor=")
    if cfg.concurrency * cfg.gpus_per_actor > gpus:
        raise ValueError(f"{cfg.concurrency} actor(s) x {cfg.gpus_per_actor} GPU > the cluster's {gpus:g} GPU(s)")


def _check_output_outside_input(cfg: ScoreConfig, in_fs: pafs.FileSystem, in_path: str, out_fs: pafs.FileSystem,
                                out_root: str, files: list[str], outputs: dict[str, str]) -> None:
    """Results written into the image set would become part of it (the next read takes them for images), or
    overwrite its files."""
    if type(in_fs) is not type(out_fs):
        return
    inside = os.path.normpath(out_root) + "/"
    if inside.startswith(os.path.normpath(in_path) + "/") or set(outputs.values()) & set(files):
        raise ValueError(f"output={cfg.output} is the input image set or inside it ({cfg.input}): "
                         "write the results somewhere else")


class Joiner:
    """Joins result files' pieces (join_pieces), one file after another, with one output filesystem."""

    def __init__(self, output: str, options: S3Options, out_root: str):
        self.fs, self.out_root = filesystem_for(output, options)[0], out_root

    def join(self, output: str, identity: dict, rows: int) -> None:
        join_pieces(self.fs, self.out_root, output, identity, rows)


def _score_files(cfg: ScoreConfig, options: S3Options, plan: ScorePlan, progress: Progress) -> float | None:
    """The Ray Data pipeline over the plan's files to do, its actors writing the result pieces; a Joiner joins
    them. Returns when (time.perf_counter) the first scored rows were counted: the job's start-up ends there."""
    import ray

    from cluster.ray_init import data_logs, init_ray
    from jobs.score_read import RowGroups

    init_ray(cfg.address, min_cpus=cfg.concurrency * cfg.cpus_per_actor + READ_CPUS)  # embedded: sized for _check_fits
    _check_fits(ray.cluster_resources(), cfg)
    data_logs(cfg.verbose)
    ray.data.DataContext.get_current().target_max_block_size = int(cfg.block_mb * 2**20)
    # A file's pieces are joined as soon as all its rows are scored, so a job killed later keeps it. One actor
    # joins them all, in turn: a result row is a few dozen bytes, and a task per file would start a process
    # per file (importing pyarrow) while the pipeline holds the CPUs, so files appeared only near the end.
    joiner = ray.remote(Joiner).options(num_cpus=0).remote(cfg.output, options, plan.out_root)
    left = {path: plan.rows_in[path] for path in plan.todo}

    def join(path: str) -> ray.ObjectRef:
        return joiner.join.remote(plan.outputs[path], plan.identities[path], plan.rows_in[path])

    joins = [join(path) for path in plan.todo if plan.rows_in[path] == 0]
    first_results = None
    source = RowGroups([g for g in plan.groups if g[0] in left], cfg.input, options, cfg.block_mb)
    if source.groups:
        # One block stream per row group: Ray Data would otherwise split each read's blocks to reach its own
        # default count of blocks (a few hundred), into pieces far smaller than block_mb.
        ds = ray.data.read_datasource(source, num_cpus=READ_CPUS, override_num_blocks=len(source.groups))
        if decodes_in_tasks(cfg):
            ds = ds.map_batches(decode_stage, batch_format="pyarrow", num_cpus=1,
                                fn_kwargs={"channels": plan.detector.channels, "size": tuple(plan.detector.input_size)})
        ds = ds.map_batches(
            Scorer, batch_format="pyarrow", batch_size=cfg.batch_size, **actor_resources(cfg),
            compute=ray.data.ActorPoolStrategy(size=cfg.concurrency),
            fn_constructor_kwargs={"checkpoint": plan.checkpoint, "options": options, "threshold": plan.threshold,
                                   "model_id": plan.model_id, "output": cfg.output},
        )
        for counts in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            first_results = first_results or time.perf_counter()
            for path, rows in zip(counts.column("path").to_pylist(), counts.column("rows").to_pylist()):
                left[path] -= rows
                if left[path] == 0:
                    joins.append(join(path))
            progress.update(int(pc.sum(counts.column("rows")).as_py()))
    ray.get(joins)
    unscored = [os.path.basename(p) for p, n in left.items() if n != 0]
    if unscored:
        raise RuntimeError(f"not every row of {', '.join(unscored)} was scored once: run the same command again")
    return first_results


@dataclass
class ScorePlan:
    """What a score run reads, writes and scores with: decided, and checked, before Ray starts."""

    checkpoint: str  # the checkpoint folder (where checkpoint= named a run: its best checkpoint)
    detector: Detector
    model_id: str  # content hash of the checkpoint
    threshold: float | None  # None: contamination= sets it once every row is scored
    in_fs: pafs.FileSystem
    files: list[str]  # the input's parquet files
    groups: list[RowGroup]  # their row groups (the read tasks)
    rows_in: dict[str, int]  # rows per input file
    out_fs: pafs.FileSystem
    out_root: str
    outputs: dict[str, str]  # input file -> its result file
    identities: dict[str, dict]  # input file -> what its result file must record to be complete (result_identity)
    todo: list[str]  # the input files whose result is not complete


def plan_score(cfg: ScoreConfig, options: S3Options) -> ScorePlan:
    check_readable(cfg.checkpoint, options)
    checkpoint = locate(cfg.checkpoint, filesystem_for(cfg.checkpoint, options)[0])
    model_fs, model_path = filesystem_for(checkpoint, options)
    detector = load_detector(model_path, model_fs)
    model_id = checkpoint_id(model_path, model_fs)
    threshold = cfg.threshold if cfg.threshold is not None else detector.threshold_
    if threshold is None and cfg.contamination is None:
        raise ValueError(f"{cfg.checkpoint} stores no threshold: give threshold= or contamination=")
    if cfg.contamination is not None:
        threshold = None
    check_readable(cfg.input, options)
    in_fs, in_path = filesystem_for(cfg.input, options)
    in_fs, files = list_parquet_files(in_path, in_fs)
    check_image_set(in_path, in_fs)
    out_fs, out_root = filesystem_for(cfg.output, options)
    out_fs.create_dir(out_root, recursive=True)
    outputs = {f: f"{out_root}/{os.path.basename(f)}" for f in files}
    if len(set(outputs.values())) != len(files):
        raise ValueError(f"{cfg.input} has input files with the same name in different folders")
    _check_output_outside_input(cfg, in_fs, in_path, out_fs, out_root, files, outputs)
    groups = row_groups(in_fs, files)  # the footers, read once for the row counts and the read tasks
    rows_in = dict.fromkeys(files, 0)
    for path, _, _, rows, _ in groups:
        rows_in[path] += rows
    identities = {f: result_identity(model_id, threshold, cfg.contamination, input_identity(in_fs, f)) for f in files}
    todo = [f for f in files if not is_complete(out_fs, outputs[f], rows_in[f], identities[f])]
    for f in todo:
        clear_pieces(out_fs, out_root, os.path.basename(f))  # what a killed run of this output left
    _check_input_shape(detector, in_fs, todo or files)
    return ScorePlan(checkpoint, detector, model_id, threshold, in_fs, files, groups, rows_in, out_fs, out_root,
                     outputs, identities, todo)


def run(cfg: ScoreConfig) -> dict:
    start = time.perf_counter()
    options = S3Options.from_env(endpoint=cfg.s3_endpoint)
    plan = plan_score(cfg, options)
    todo_rows = sum(plan.rows_in[f] for f in plan.todo)
    print(f"scoring {todo_rows} rows in {len(plan.todo)} file(s) ({len(plan.files) - len(plan.todo)} already "
          f"complete) with model {plan.model_id}", file=sys.stderr)
    first_results = None
    if plan.todo:
        with Progress(todo_rows, unit="rows", label="scoring", quiet=cfg.quiet) as progress:
            first_results = _score_files(cfg, options, plan, progress)
        remove_parts_folder(plan.out_fs, plan.out_root)  # every input joined: the folder of pieces is empty
    first_results_s = None if first_results is None else first_results - start
    summary = summarize(cfg, plan, time.perf_counter() - start, first_results_s)
    write_bytes(plan.out_fs, f"{plan.out_root}/_summary.json", json.dumps(summary, indent=1).encode())
    # Tracked once the table is complete (a re-run of the same output continues the same MLflow run).
    with start_run(cfg.tracking, f"score-{os.path.basename(plan.out_root.rstrip('/'))}") as tracker:
        tracker.log_params(config_params(cfg))
        tracker.log_metrics(summary)
        tracker.log_text(json.dumps(summary, indent=1), "_summary.json")
        tracker.set_checkpoint(plan.checkpoint)
    print(f"rows {summary['rows']}  errors {summary['errors']}  anomalies {summary['anomalies']}  "
          f"threshold {summary['threshold']:.6g}  wall {summary['seconds']:.1f} s  {summary['images_per_s']} images/s")
    print(f"results: {cfg.output}")
    return summary


def summarize(cfg: ScoreConfig, plan: ScorePlan, wall: float, first_results_s: float | None) -> dict:
    """The run's summary (_summary.json), from the complete result table; contamination= sets the threshold."""
    threshold = plan.threshold
    if cfg.contamination is not None:
        threshold = apply_contamination(plan.out_fs, list(plan.outputs.values()), cfg.contamination)
    results = pq.read_table([plan.outputs[f] for f in plan.files], columns=["error", "is_anomaly"],
                            filesystem=plan.out_fs)
    scored = sum(plan.rows_in[f] for f in plan.todo)
    return {"rows": results.num_rows, "errors": results.num_rows - results.column("error").null_count,
            "anomalies": int(pc.sum(results.column("is_anomaly")).as_py() or 0), "threshold": threshold,
            "scored_now": scored, "seconds": round(wall, 2), "images_per_s": round(scored / wall, 1),
            # Start-up (Ray Data's plan, the actors' processes and imports) and the first block's scoring.
            "first_results_s": None if first_results_s is None else round(first_results_s, 2),
            "model_id": plan.model_id, "output": cfg.output}
