"""The score job against one plain process doing the same work, with a per-stage breakdown: the pipeline's ceiling.

python benchmarks/score_pipeline.py [--rows 1000000] [--kinds raw28,png28] [--model free] [--concurrency 1,2]
                                    [--repeats 1] [--write-docs]

--model free scores with the `free` plug-in detector (benchmarks/plugins/free_detector, installed under --work
and on the path of this process and of Ray's workers), whose score costs nothing: what is measured is the
pipeline's own cost, read -> decode -> result rows -> write. --model gradcon scores with a GradCon CAE fitted one
epoch (the model's cost included). The sets are the whole MNIST set, prepared as `gradcon prepare` writes it (28x28
PNG, or `encoding=raw`), its rows repeated under new ids to --rows rows (benchmarks/score_targets.py, shared).

For each set: one plain process (this one: read a row group, decode, score, build result rows, write, one after
another, with gradcon_core.results.table's functions, each stage timed), then the score job through Ray Data at
each --concurrency, on a warm Ray: started once, configured as ray_cluster.yaml configures a cluster (its workers
import gradcon_core and Ray Data before they take work, cluster/ray_init.py PRELOAD), and given WARM_S before
each job for the workers it starts to finish those imports, as on a long-lived cluster. The job's
summary gives its stages' seconds (summed over row groups; they overlap) and its start-up: planning (footers,
result files), to the first actor's __init__ (Ray Data's plan, the actor's process and imports), the actor's
__init__ (the checkpoint) and its first call.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import publish  # noqa: E402
from score_targets import SHAPES, image_set, sample_images  # noqa: E402

from gradcon_core.data.images import decode_images  # noqa: E402
from gradcon_core.data.imageset import IMAGE, image_bytes, list_parquet_files  # noqa: E402
from gradcon_core.results.row_groups import READ_COLUMNS  # noqa: E402
from gradcon_core.results.table import PASSTHROUGH, SCHEMA, result_columns, score_pixels  # noqa: E402

PLUGIN = Path(__file__).resolve().parent / "plugins" / "free_detector"
WARM_S = 8.0  # before each job: the workers Ray starts after a job finish their imports
NOTE = ("The job's rate counts its start-up; \"after its first results\" leaves it out. Start-up: the driver's "
        "plan, then the first actor's way from the pool's start: a process (0 when Ray had one waiting), its imports "
        "(torch's among them: under half a second when the worker had them preloaded, about 2 s on 2 busy cores when "
        "Ray had to start one), the rest of the way to its __init__, the checkpoint, and its first call (one row "
        "group). Stage seconds are summed over the row groups, each in its own thread, so they overlap.")


def install_free_detector(work: Path) -> None:
    """The `free` plug-in, pip-installed under work/plugins and put on the path of this process and of every Ray
    worker it starts (which inherit the environment)."""
    target = work / "plugins"
    if not (target / "free_detector.py").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(PLUGIN)], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(target), os.environ.get("PYTHONPATH")) if p)
    sys.path.insert(0, str(target))


def checkpoint(model: str, kind: str, data: Path, work: Path) -> str:
    from gradcon_core import GradConDetector, create_detector, create_model

    channels, side = SHAPES[kind]
    path = work / f"model-{model}-{side}x{side}x{channels}"
    if not path.exists():
        if model == "free":
            det = create_detector("free", in_channels=channels, image_size=[side, side]).fit(None)
        else:
            pixels, _ = decode_images(sample_images(data, 2048), channels, (side, side))
            det = GradConDetector(create_model("gradcon_cae", in_channels=channels, image_size=side), device="cpu")
            det.fit(pixels, epochs=1)
        det.save(path)
    return str(path)


def one_process(model: str, data: Path, out: Path, batch_size: int) -> tuple[float, dict[str, float]]:
    """Seconds, and seconds per stage, of one process scoring every row group in turn into its result file."""
    from gradcon_core import load_detector
    from gradcon_core.training.checkpoint import checkpoint_id

    start = time.perf_counter()
    det, model_id = load_detector(model), checkpoint_id(model)
    stages = dict.fromkeys(("read", "decode", "score", "rows", "write"), 0.0)

    def timed(stage: str, fn, *args):
        t = time.perf_counter()
        result = fn(*args)
        stages[stage] += time.perf_counter() - t
        return result

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for path in list_parquet_files(str(data))[1]:
        pf = pq.ParquetFile(path)
        with pq.ParquetWriter(out / Path(path).name, SCHEMA, compression="zstd") as writer:
            columns = [c for c in (IMAGE, *READ_COLUMNS) if c in pf.schema_arrow.names]  # what the job reads
            for group in range(pf.metadata.num_row_groups):
                table = timed("read", pf.read_row_group, group, columns)
                for k in range(0, table.num_rows, batch_size):
                    batch = table.slice(k, batch_size)
                    pixels, errors = timed("decode", decode_images, image_bytes(batch.column(IMAGE)), det.channels,
                                           tuple(det.input_size))
                    scores = timed("score", score_pixels, det, pixels, errors)
                    passthrough = {c: batch.column(c) for c in PASSTHROUGH if c in columns}
                    rows = timed("rows", result_columns, batch.column("id"), scores, errors, det.threshold_, model_id,
                                 passthrough)
                    timed("write", writer.write_table, rows)
    return time.perf_counter() - start, stages


def job(model: str, data: Path, out: Path, concurrency: int, batch_size: int, gpus: float) -> dict:
    from jobs.score import ScoreConfig, run

    shutil.rmtree(out, ignore_errors=True)
    time.sleep(WARM_S)
    return run(ScoreConfig(checkpoint=model, input=str(data), output=str(out), concurrency=concurrency,
                           batch_size=batch_size, gpus_per_actor=gpus, quiet=True))


def stages_text(stages: dict[str, float]) -> str:
    return " / ".join(f"{stages[s]:.1f}" for s in ("read", "decode", "score", "rows", "write"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--kinds", default="raw28,png28")
    parser.add_argument("--model", choices=("free", "gradcon"), default="free")
    parser.add_argument("--concurrency", default="1,2", help="scoring actors, comma-separated")
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--gpus-per-actor", type=float, default=1.0 if torch.cuda.is_available() else 0.0)
    parser.add_argument("--repeats", type=int, default=1, help="runs of the process and of each job (medians)")
    parser.add_argument("--mnist", default="data/mnist")
    parser.add_argument("--work", default="runs/bench-pipeline")
    parser.add_argument("--write-docs", action="store_true", help="the table into docs/benchmarks.md")
    args = parser.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    install_free_detector(work)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.ray_init import PRELOAD, init_ray

    torch.set_num_threads(1)  # one plain process: one thread, as the job's actors score
    actors = [int(n) for n in args.concurrency.split(",")]
    init_ray("local", num_cpus=max(os.cpu_count(), max(actors) + 1), log_to_driver=False,
             _system_config={"preload_python_modules": PRELOAD})
    rows = ["| set | one process | score job | ratio | after its first results | first results (plan / to process / "
            "imports / to actor / actor init / first call) | stages s: read / decode / score / rows / write "
            "| objects written per 1M rows |",
            "|---|---:|---:|---:|---:|---|---|---:|"]
    for kind in args.kinds.split(","):
        data = image_set(kind, work, args.rows, args.mnist)
        model = checkpoint(args.model, kind, data, work)
        groups = sum(pq.ParquetFile(p).metadata.num_row_groups for p in list_parquet_files(str(data))[1])
        job(model, data, work / "warm-up", 1, args.batch_size, args.gpus_per_actor)  # the first job's costs, once
        process = [one_process(model, data, work / "out-process", args.batch_size) for _ in range(args.repeats)]
        seconds = statistics.median(t for t, _ in process)
        print(f"{kind}: one process {args.rows / seconds:,.0f} rows/s  stages s {stages_text(process[0][1])}",
              flush=True)
        rows.append(f"| {kind}, {args.rows:,} rows, {groups} row groups | {args.rows / seconds:,.0f} rows/s | | | | "
                    f"| {stages_text(process[0][1])} (one process) | |")
        for concurrency in actors:
            runs = [job(model, data, work / "out-job", concurrency, args.batch_size, args.gpus_per_actor)
                    for _ in range(args.repeats)]
            s = sorted(runs, key=lambda r: r["images_per_s"])[len(runs) // 2]
            up = s["startup_s"]
            per_million = s["objects_written"] * 1_000_000 / args.rows
            left = s["seconds"] - s["first_results_s"]
            after = args.rows / left if left > 0 else float("nan")  # (nan: the first results were the last)
            print(f"{kind}: job, {concurrency} actor(s) {s['images_per_s']:,.0f} rows/s "
                  f"({s['images_per_s'] * seconds / args.rows:.2f}x)  first results {s['first_results_s']} s {up}  "
                  f"stages s {stages_text(s['stages_s'])}  objects {s['objects_written']}", flush=True)
            rows.append(f"| {kind}, job with {concurrency} actor(s) | | {s['images_per_s']:,.0f} rows/s | "
                        f"{s['images_per_s'] * seconds / args.rows:.2f}x | {after:,.0f} rows/s | "
                        f"{s['first_results_s']} s ("
                        f"{' / '.join(str(v) for v in up.values())}) | {stages_text(s['stages_s'])} "
                        f"| {per_million:,.0f} |")
    table = "\n".join(rows)
    print(table)
    if args.write_docs:
        device = "GPU" if torch.cuda.is_available() else "CPU"
        publish(f"score-pipeline-{device.lower()}-{args.model}",
                f"The score job's pipeline against one process ({device}, {args.model} scoring)", f"{NOTE}\n\n{table}")


if __name__ == "__main__":
    main()
