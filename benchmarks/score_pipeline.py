"""Scoring pipeline: the Ray Data job vs a bare single-process loop over the same files, and memory.

python benchmarks/score_pipeline.py [--rows 200000] [--files 8] [--concurrency 1,2,4] [--decode actor,tasks]
                                    [--repeats 3]

The image set is synthetic but realistic: real MNIST test digits, shifted and noised so no two
rows are the same, PNG-encoded, split over several parquet files. Both paths read parquet,
decode, compute vectorized GradCon scores and write a result table with the same code
(gradcon_core.results.table). Peak memory is the largest sum of the resident memory of this
process and all its children (Ray's workers), sampled every 0.2 s, at 1x and 10x the rows. The driver's
CPU time (this process alone: what a funnel through the driver would load) is given per second of the job.
With several --decode choices (the score job's decode=actor|tasks) or --concurrency values (scoring actors),
each runs on the same sets, side by side. With --repeats N the bare loop and each job on the 10x set run N times,
in turn, and the median is kept (a small shared machine's timings vary by tens of percent from run to run). A job's
"first results" is its start-up: seconds until the first scored rows reached the driver.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradcon_core import GradConDetector, create_model, load_detector  # noqa: E402
from gradcon_core.data.idx import load_mnist  # noqa: E402
from gradcon_core.data.images import encode_png  # noqa: E402
from gradcon_core.data.imageset import IMAGE, ImageSetWriter, image_bytes, list_parquet_files  # noqa: E402
from gradcon_core.results.table import SCHEMA, result_rows  # noqa: E402
from gradcon_core.training.checkpoint import checkpoint_id  # noqa: E402


def make_set(path: Path, rows: int, files: int, mnist_dir: str) -> None:
    if path.exists() and sum(pq.ParquetFile(p).metadata.num_rows for p in path.glob("*.parquet")) == rows:
        return
    digits, labels = load_mnist(mnist_dir, "test")
    rng = np.random.default_rng(0)
    writer = ImageSetWriter(str(path), rows_per_file=-(-rows // files))
    for start in range(0, rows, 4096):
        n = min(4096, rows - start)
        pick = rng.integers(0, len(digits), n)
        shifted = np.stack([np.roll(digits[i], rng.integers(-2, 3, 2), axis=(0, 1)) for i in pick]).astype(np.int16)
        noisy = np.clip(shifted + rng.integers(-12, 13, shifted.shape), 0, 255).astype(np.uint8)
        writer.write(pa.table({"id": [f"img-{start + k:08d}" for k in range(n)],
                               IMAGE: pa.array([encode_png(x) for x in noisy], pa.binary()),
                               "label": pa.array(labels[pick], pa.int64())}))
    writer.close()


class PeakMemory:
    """Largest RSS of this process plus its children, sampled in a thread (whose own CPU time is `cpu`)."""

    def __init__(self):
        self.peak, self.cpu = 0, 0.0
        self._stop = threading.Event()

    def _sample(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            self.cpu = time.thread_time()
            time.sleep(0.2)

    def __enter__(self):
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def bare_loop(model: str, data: Path, out: Path, batch_size: int) -> float:
    start = time.perf_counter()
    det = load_detector(model)
    model_id = checkpoint_id(model)
    out.mkdir(parents=True, exist_ok=True)
    fs, files = list_parquet_files(str(data))
    for path in files:
        with pq.ParquetWriter(out / Path(path).name, SCHEMA, compression="zstd") as writer:
            for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_size):
                writer.write_table(result_rows(det, batch.column("id").to_pylist(), image_bytes(batch.column(IMAGE)),
                                               det.threshold_, model_id, {"label": batch.column("label")}))
    return time.perf_counter() - start


def where_time_goes(model: str, data: Path, batch_size: int, device: str) -> None:
    """Single process: seconds spent reading, decoding and scoring the same rows."""
    import torch

    from gradcon_core.data.images import decode_images

    det = load_detector(model).to(device)
    times = {"read": 0.0, "decode": 0.0, "score": 0.0}
    rows = 0
    _, files = list_parquet_files(str(data))
    for path in files:
        t = time.perf_counter()
        batches = list(pq.ParquetFile(path).iter_batches(batch_size=batch_size))
        times["read"] += time.perf_counter() - t
        for batch in batches:
            t = time.perf_counter()
            pixels, _ = decode_images(image_bytes(batch.column(IMAGE)), 1, (28, 28))
            times["decode"] += time.perf_counter() - t
            t = time.perf_counter()
            det.decision_function(pixels)
            if device != "cpu":
                torch.cuda.synchronize()
            times["score"] += time.perf_counter() - t
            rows += len(pixels)
    total = sum(times.values())
    print(f"where the time goes ({device}, {rows} rows, batch {batch_size}): " + "  ".join(
        f"{k} {v:.1f} s ({100 * v / total:.0f}%, {rows / v:,.0f} img/s)" for k, v in times.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--files", type=int, default=8)
    parser.add_argument("--concurrency", default="2", help="scoring actors, comma-separated (e.g. 1,2,4)")
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--ray-cpus", type=int, default=None,
                        help="logical CPUs of the embedded Ray (default: cores + 1, room for the reads)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--gpus-per-actor", type=float, default=0.0)
    parser.add_argument("--decode", default="auto", help="the score job's decode setting(s), comma-separated")
    parser.add_argument("--repeats", type=int, default=1, help="runs of the bare loop and of each 10x job (median)")
    parser.add_argument("--mnist", default="data/mnist")
    parser.add_argument("--work", default="runs/bench-score")
    parser.add_argument("--split-only", default=None, metavar="DEVICE",
                        help="only time read / decode / score in one process on DEVICE (cpu, cuda)")
    args = parser.parse_args()
    work = Path(args.work)
    big, small = work / f"set-{args.rows}", work / f"set-{args.rows // 10}"
    make_set(big, args.rows, args.files, args.mnist)
    make_set(small, args.rows // 10, args.files, args.mnist)
    model = work / "model"
    if not model.exists():
        det = GradConDetector(create_model("gradcon_cae"), device="cpu")
        det.fit(load_mnist(args.mnist, "train")[0][:2048], epochs=1)
        det.save(model)
    print(f"machine: {os.cpu_count()} CPUs; {args.rows} rows in {args.files} files")
    if args.split_only:
        where_time_goes(str(model), big, args.batch_size, args.split_only)
        return

    import torch

    torch.set_num_threads(os.cpu_count())
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster.ray_init import init_ray
    from jobs.score import ScoreConfig, run

    actors = [int(n) for n in args.concurrency.split(",")]
    # Room for the largest pool and the reads (time-sliced on a small machine: the driver's load is the point).
    init_ray("local", num_cpus=args.ray_cpus or max(os.cpu_count() + 1, int(max(actors) * args.cpus_per_actor) + 1),
             log_to_driver=False)
    driver = psutil.Process()

    def job(decode: str, concurrency: int, data: Path, out: Path) -> tuple[dict, float, float]:
        """The score job's summary, its peak memory (MiB) and the driver's CPU seconds."""
        shutil.rmtree(out, ignore_errors=True)
        cpu_before = sum(driver.cpu_times()[:2])
        with PeakMemory() as mem:
            summary = run(ScoreConfig(checkpoint=str(model), input=str(data), output=str(out), decode=decode,
                                      batch_size=args.batch_size, concurrency=concurrency, quiet=True,
                                      cpus_per_actor=args.cpus_per_actor, gpus_per_actor=args.gpus_per_actor))
        return summary, mem.peak / 2**20, sum(driver.cpu_times()[:2]) - cpu_before - mem.cpu  # not the sampler's

    setups = [(decode, concurrency) for decode in args.decode.split(",") for concurrency in actors]
    small_runs = {setup: job(*setup, small, work / "out-ray-1x") for setup in setups}  # also warms Ray Data up
    bare_s, big_runs = [], {setup: [] for setup in setups}
    for _ in range(args.repeats):
        bare_s.append(bare_loop(str(model), big, work / "out-bare", args.batch_size))
        for setup in setups:
            big_runs[setup].append(job(*setup, big, work / "out-ray-10x"))
    bare = statistics.median(bare_s)
    print(f"  bare loop (1 process)      {args.rows / bare:>9,.0f} images/s  ({bare:.1f} s; runs: "
          f"{', '.join(f'{t:.1f}' for t in bare_s)} s)")
    for setup in setups:
        name = f"decode={setup[0]}, {setup[1]} actor(s)"
        small_summary, small_peak, _ = small_runs[setup]
        runs = big_runs[setup]
        rates = [summary["images_per_s"] for summary, _, _ in runs]
        rate = statistics.median(rates)
        first = statistics.median(summary["first_results_s"] for summary, _, _ in runs)
        peak = max(peak for _, peak, _ in runs)
        driver_cpu = statistics.median(cpu / summary["seconds"] for summary, _, cpu in runs)
        print(f"  Ray Data job, {name}, 1x  rows  {small_summary['images_per_s']:>9,.0f} images/s  "
              f"peak memory {small_peak:,.0f} MiB")
        print(f"  Ray Data job, {name}, 10x rows  {rate:>9,.0f} images/s  first results after {first:.1f} s  "
              f"peak memory {peak:,.0f} MiB  driver CPU {100 * driver_cpu:.0f}% of one core  "
              f"(runs: {', '.join(f'{r:,.0f}' for r in rates)} images/s)")
        print(f"{name}: Ray job / bare loop (10x rows) = {rate / (args.rows / bare):.2f}   "
              f"peak memory 10x / 1x = {peak / small_peak:.2f}")
    ray.shutdown()


if __name__ == "__main__":
    main()
