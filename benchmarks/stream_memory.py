"""Stream vs memory data mode: a training worker's peak memory and its time to the first step, by class size.

python benchmarks/stream_memory.py [--rows 2000,20000] [--image-size 64] [--workers 2] [--modes memory,stream]
                                   [--object-store-mb 80] [--read-ahead-mb 64]

One image set holds two classes of generated RGB textures (gradcon prepare defects, each image repeated under
new ids to reach the row counts; the data path does not care what the pixels are). For each class and each
data_mode, one GradCon epoch through the real job (jobs/train.py) on an embedded Ray, while this process polls
every Ray Train worker's resident-memory high-water mark (Linux /proc VmHWM) and what it is made of (see
PeakMemory). Printed per run: the largest worker peak, with its object-store and private parts, the workers'
time from start to their first step (first_step_s, from the epoch report), the epoch's images/s and rank 0's
per-step breakdown. The claims it checks: in stream mode the peak is flat
(within 15%) from the small class to the large one, and the time to the first step follows the class's rows,
never the whole set's. The object-store part grows with the data a worker has read, up to the store's size
(mapped pages stay in a reader's RSS): --object-store-mb shrinks the embedded Ray's store to show that bound,
and --read-ahead-mb sets the train job's read_ahead_mb (stream mode), which bounds them without a smaller store.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.compute as pc

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import repeat_rows  # noqa: E402

from gradcon_core.data.defects import DefectCounts, defect_tables  # noqa: E402
from gradcon_core.data.imageset import ImageShape, write_image_set  # noqa: E402


def make_set(path: str, rows: list[int], size: int, distinct: int = 250) -> None:
    """One class per entry of rows (labels 0, 1, ...): `distinct` generated images repeated under new ids."""
    classes = ("fabric", "wood", "metal", "carpet")[: len(rows)]
    base = pa.concat_tables(defect_tables(size, seed=0, counts=DefectCounts(distinct, 0, 0), classes=classes))
    base = base.select(["id", "image", "label", "split"])
    parts = []
    for label, count in enumerate(rows):
        parts.append(repeat_rows(base.filter(pc.equal(base["label"], label)), count))
    write_image_set(path, pa.concat_tables(parts), rows_per_file=2000, shape=ImageShape((size, size), 3))


class PeakMemory:
    """Polls Ray Train worker processes' memory while running (Linux /proc/PID/status): VmHWM, the kernel's
    peak resident memory, and the largest sampled RssShmem (shared memory pages mapped in: Ray's object-store
    blocks the worker read, which the object store's own limit bounds) and RssAnon (the worker's private memory)."""

    FIELDS = ("VmHWM", "RssShmem", "RssAnon")

    def __init__(self, every_s: float = 0.2):
        self.peaks: dict[str, dict[int, int]] = {name: {} for name in self.FIELDS}
        self.every_s, self.stop = every_s, threading.Event()
        self.thread = threading.Thread(target=self._poll, daemon=True)

    def __enter__(self) -> PeakMemory:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()

    def largest(self, name: str) -> int:
        """The largest peak of one field over the workers."""
        return max(self.peaks[name].values())

    def _poll(self) -> None:
        while not self.stop.is_set():
            for proc in psutil.process_iter(["pid", "cmdline"]):
                if "RayTrainWorker" not in " ".join(proc.info["cmdline"] or []):
                    continue
                try:
                    status = Path(f"/proc/{proc.info['pid']}/status").read_text()
                except OSError:
                    continue  # (it ended)
                values = {k: int(v.split()[0]) * 1024 for k, v in
                          (line.split(":", 1) for line in status.splitlines()) if k in self.FIELDS}
                for name, value in values.items():
                    self.peaks[name][proc.info["pid"]] = max(value, self.peaks[name].get(proc.info["pid"], 0))
            self.stop.wait(self.every_s)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="2000,20000", help="training rows of each class")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--modes", default="memory,stream", help="data modes to run, side by side")
    parser.add_argument("--object-store-mb", type=int, default=None,
                        help="the embedded Ray's object store (default: Ray's, 30%% of memory)")
    parser.add_argument("--read-ahead-mb", type=int, default=None, help="the train job's read_ahead_mb (stream mode)")
    args = parser.parse_args()
    rows = [int(r) for r in args.rows.split(",")]
    modes = args.modes.split(",")
    if not set(modes) <= {"memory", "stream"}:
        parser.error(f"--modes takes memory and/or stream, got {args.modes!r}")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    from cluster.ray_init import init_ray
    from jobs.train import TrainConfig, run

    with tempfile.TemporaryDirectory() as tmp:
        data = f"{tmp}/set"
        start = time.perf_counter()
        make_set(data, rows, args.image_size)
        print(f"image set: {sum(rows):,} rows ({', '.join(f'class {c}: {r:,}' for c, r in enumerate(rows))}), "
              f"{args.image_size}x{args.image_size}x3 PNG, made in {time.perf_counter() - start:.0f} s")
        # The workers + 2 logical CPUs for Ray Data's reads (the train job requires them).
        store = {} if args.object_store_mb is None else {"object_store_memory": args.object_store_mb * 2**20}
        init_ray("local", num_cpus=max(os.cpu_count(), args.workers) + 2, log_to_driver=False, **store)
        results = {}
        for mode in modes:
            for label, count in enumerate(rows):
                cfg = TrainConfig(data=data, normal_class=label, epochs=1, num_workers=args.workers,
                                  data_mode=mode, storage=f"{tmp}/runs", name=f"{mode}-{label}", quiet=True,
                                  read_ahead_mb=args.read_ahead_mb)
                with PeakMemory() as memory:
                    result, _ = run(cfg)
                first = result.metrics["first_step_s"]
                peak, shared, private = (memory.largest(name) for name in PeakMemory.FIELDS)
                results[mode, count] = peak, first, private
                steps = "  ".join(f"{k[5:-3]} {result.metrics[k]:.1f}" for k in result.metrics if k.startswith("step_"))
                print(f"{mode:6s} class of {count:6,} rows: peak worker RSS {peak / 2**20:7,.0f} MiB (sampled peaks: "
                      f"object-store pages {shared / 2**20:,.0f} MiB, private {private / 2**20:,.0f} MiB)  first step "
                      f"{first:6.1f} s  {result.metrics['images_per_s']:6.1f} images/s  step ms: {steps}")
        ray.shutdown()
    small, large = rows[0], rows[-1]
    for mode in modes:
        (peak_s, first_s, private_s), (peak_l, first_l, private_l) = results[mode, small], results[mode, large]
        print(f"{mode}: peak RSS {large:,} / {small:,} rows = {peak_l / peak_s:.2f}x (stream target <= 1.15; "
              f"private memory {private_l / private_s:.2f}x); "
              f"first step {first_l / first_s:.2f}x (rows {large / small:.0f}x)")


if __name__ == "__main__":
    main()
