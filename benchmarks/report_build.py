"""gradcon report: build time, peak memory and size of the report for result tables of 10k and 1M rows.

python benchmarks/report_build.py [--rows 10000 1000000] [--top-k 24] [--normal-sample 12] [--quick]

Synthetic but shaped like the real thing: an image set of N PNG-encoded MNIST test digits (ids unique,
the 10,000 digits cycled; no dictionary encoding, so the file is as large as N distinct images) in files
of 20k rows as gradcon prepare writes them, and the result table gradcon score would write for it (one
file per input file; log-normal scores, 10% labelled anomalies, 0.1% error rows). Each build runs in a
fresh process, so its peak resident memory (ru_maxrss) is its own; the line also gives that process's
memory before the build. --quick: 2,000 and 20,000 rows.
"""
from __future__ import annotations

import argparse
import multiprocessing
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from gradcon_core.data.idx import load_mnist  # noqa: E402
from gradcon_core.data.images import encode_png  # noqa: E402
from gradcon_core.results.table import SCHEMA  # noqa: E402

ROWS_PER_FILE = 20_000  # as gradcon prepare writes image sets, and score one result file per input file


def make_data(root: Path, rows: int, mnist_dir: str) -> tuple[Path, Path]:
    images, results = root / f"set-{rows}", root / f"scores-{rows}"
    if results.exists():
        return images, results
    digits, labels = load_mnist(mnist_dir, "test")
    pngs = [encode_png(d) for d in digits]
    rng = np.random.default_rng(0)
    images.mkdir(parents=True), results.mkdir(parents=True)
    for k, start in enumerate(range(0, rows, ROWS_PER_FILE)):
        n = min(ROWS_PER_FILE, rows - start)
        pick = np.arange(start, start + n) % len(pngs)
        ids = pa.array([f"img-{i:09d}" for i in range(start, start + n)])
        pq.write_table(pa.table({"id": ids, "image": pa.array([pngs[i] for i in pick], pa.binary()),
                                 "label": pa.array(labels[pick], pa.int64())}),
                       images / f"part-{k:05d}.parquet", use_dictionary=["id", "label"], compression="zstd")
        truth = rng.random(n) < 0.1
        score = rng.lognormal(-3 + truth, 0.4).astype(np.float32)
        failed = rng.random(n) < 0.001
        threshold = float(np.exp(-3 + 0.4 * 1.645))
        table = pa.table({
            "id": ids, "score": pa.array(score, mask=failed), "recon_error": pa.array(score, mask=failed),
            "grad_score": pa.nulls(n, pa.float32()), "is_anomaly": pa.array(score > threshold, mask=failed),
            "threshold": pa.array(np.full(n, threshold)), "model_id": pa.array(["bench"] * n),
            "error": pa.array([f"undecodable image (row {i})" if f else None for i, f in zip(range(n), failed)]),
            "label": pa.array(labels[pick], pa.int64()), "is_anomaly_true": pa.array(truth)}, schema=SCHEMA)
        pq.write_table(table, results / f"part-{k:05d}.parquet", compression="zstd")
    return images, results


def _build(images: str, results: str, out: str, top_k: int, normal_sample: int, queue) -> None:
    from gradcon_core.detectors.registry import create_detector
    from gradcon_core.results.report import build_report

    detector = create_detector("cae", in_channels=1, device="cpu")  # untrained: the report's cost is the same
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    build_report(results, out, images=images, detector=detector, top_k=top_k, normal_sample=normal_sample)
    queue.put((time.perf_counter() - start, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss))


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[10_000, 1_000_000])
    parser.add_argument("--top-k", type=int, default=24)
    parser.add_argument("--normal-sample", type=int, default=12)
    parser.add_argument("--workdir", default="runs/bench-report-build")
    parser.add_argument("--mnist", default="data/mnist")
    parser.add_argument("--quick", action="store_true", help="2,000 and 20,000 rows")
    args = parser.parse_args()
    sizes = [2_000, 20_000] if args.quick else args.rows
    root = Path(args.workdir)
    context = multiprocessing.get_context("spawn")
    print(f"report build, top-k {args.top_k}, normal sample {args.normal_sample}, reconstructions by a CAE")
    print(f"{'rows':>10} {'build s':>8} {'rows/s':>11} {'peak MiB':>9} {'start MiB':>9} {'report KiB':>10} "
          f"{'table MiB':>9} {'images MiB':>10}")
    for rows in sizes:
        images, results = make_data(root, rows, args.mnist)
        out = root / f"report-{rows}"
        queue = context.Queue()
        proc = context.Process(target=_build, args=(str(images), str(results), str(out), args.top_k,
                                                    args.normal_sample, queue))
        proc.start()
        seconds, before, peak = queue.get()
        proc.join()
        print(f"{rows:>10,} {seconds:>8.2f} {rows / seconds:>11,.0f} {peak / 1024:>9.0f} {before / 1024:>9.0f} "
              f"{folder_bytes(out) / 1024:>10.0f} {folder_bytes(results) / 2**20:>9.1f} "
              f"{folder_bytes(images) / 2**20:>10.1f}")


if __name__ == "__main__":
    main()
