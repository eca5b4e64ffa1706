"""The score job's throughput targets on one node, each beside its two ceilings: one command for a GPU node.

python benchmarks/score_targets.py [--rows 200000] [--gpus-per-actor 1] [--kinds png28,raw28,jpeg128]

Three sets of --rows rows, written under --work: MNIST as 28x28 PNG and as raw pixels
(`prepare --encoding raw`), and the generated 128x128 RGB textures (`prepare defects`) re-encoded as JPEG
(quality 90). Generating 200k textures takes longer than scoring them, so each set is its prepared rows
repeated under new ids until it has the rows: the same bytes decode at the same cost. A detector per
image size is fitted for one epoch on the set's first rows (on the scorer's device), then for each set:
- the score job (`jobs.score.run` with the CLI's defaults but batch_size), its images/s over the whole run,
  its first results (start-up: planning and the actors' start, on a Ray started once before, its workers
  preloading gradcon_core as ray_cluster.yaml's do) and the rate after them
  (rows / (seconds - first results): a rough steady state, too high where the first results hold much of
  the set, as in small runs);
- the ceilings: the scorer alone on the device (`decision_function` on decoded pixels) and one process's
  `decode_images` rate times this machine's CPUs;
- the target the project set for one H100/H200 node, and the job's ratio to it.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from functools import partial
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from common import images_per_second, publish, repeat_rows  # noqa: E402
from decode_speed import jpeg  # noqa: E402

from gradcon_core import GradConDetector, create_model  # noqa: E402
from gradcon_core.data.defects import DefectCounts  # noqa: E402
from gradcon_core.data.images import decode_image, decode_images  # noqa: E402
from gradcon_core.data.imageset import IMAGE, ImageShape, image_bytes, list_parquet_files, write_image_set  # noqa: E402
from jobs.prepare import prepare  # noqa: E402

TARGETS = {"png28": 150_000, "raw28": 300_000, "jpeg128": 40_000}  # images/s end to end, one H100/H200 node
SHAPES = {"png28": (1, 28), "raw28": (1, 28), "jpeg128": (3, 128)}  # channels, side
UNIQUE_TEXTURES = DefectCounts(train=400, test_normal=25, test_defective=25)  # x 4 kinds: 1,800 rows


def prepared(kind: str, work: Path, mnist: str) -> Path:
    """The set as `gradcon prepare` writes it (once)."""
    out = work / f"prepared-{kind}"
    if not out.exists():
        if kind == "jpeg128":
            prepare("defects", None, str(out), image_size=(128, 128), counts=UNIQUE_TEXTURES)
        else:
            prepare("mnist", mnist, str(out), encoding="raw" if kind == "raw28" else "png")
    return out


def image_set(kind: str, work: Path, rows: int, mnist: str) -> Path:
    """`rows` rows of the prepared set (re-encoded as JPEG for jpeg128), repeated under new ids (written once)."""
    out = work / f"set-{kind}-{rows}"
    if out.exists():
        return out
    table = pq.read_table(prepared(kind, work, mnist))
    channels, side = SHAPES[kind]
    if kind == "jpeg128":
        table = table.set_column(table.schema.get_field_index(IMAGE), IMAGE, pa.array(
            [jpeg(decode_image(b, channels, (side, side))) for b in image_bytes(table.column(IMAGE))], pa.binary()))
    partial_out = out.with_name(out.name + ".partial")  # a set cut short by a crash is never taken for done
    shutil.rmtree(partial_out, ignore_errors=True)
    write_image_set(str(partial_out), repeat_rows(table, rows), shape=ImageShape((side, side), channels))
    partial_out.rename(out)
    return out


def sample_images(data: Path, count: int) -> list[bytes]:
    blobs: list[bytes] = []
    for path in list_parquet_files(str(data))[1]:
        blobs += image_bytes(pq.read_table(path, columns=[IMAGE]).column(IMAGE))
        if len(blobs) >= count:
            break
    return blobs[:count]


def fitted(shape: tuple[int, int], data: Path, work: Path, device: str, images: int) -> tuple[str, GradConDetector]:
    """A detector for images of `shape` (channels, side), fitted one epoch on the set's first `images` images."""
    channels, size = shape
    pixels, _ = decode_images(sample_images(data, images), channels, (size, size))
    det = GradConDetector(create_model("gradcon_cae", in_channels=channels, image_size=size), device=device)
    det.fit(pixels, epochs=1)
    path = work / f"model-{size}x{size}x{channels}"
    det.save(path)
    return str(path), det


def ceilings(det: GradConDetector, data: Path, device: str, images: int) -> tuple[float, float]:
    """(decode_images images/s in one process x this machine's CPUs, the scorer alone on the device), on the
    set's first `images` images."""
    blobs = sample_images(data, images)
    start = time.perf_counter()
    pixels, _ = decode_images(blobs, det.channels, tuple(det.input_size))
    decode = len(blobs) / (time.perf_counter() - start) * os.cpu_count()
    return decode, images_per_second(partial(det.decision_function, pixels), len(pixels), torch.device(device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--kinds", default=",".join(TARGETS))
    parser.add_argument("--gpus-per-actor", type=float, default=1.0 if torch.cuda.is_available() else 0.0)
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=None, help="default: 2048 at 28x28, 512 at 128x128")
    parser.add_argument("--fit-images", type=int, default=2048, help="each detector's one training epoch")
    parser.add_argument("--ceiling-images", type=int, default=4096, help="images decoded and scored alone")
    parser.add_argument("--mnist", default="data/mnist")
    parser.add_argument("--work", default="runs/bench-targets")
    parser.add_argument("--write-docs", action="store_true", help="the table into docs/benchmarks.md")
    args = parser.parse_args()
    kinds = args.kinds.split(",")
    if unknown := set(kinds) - set(TARGETS):
        parser.error(f"unknown kinds {sorted(unknown)}; choose from {list(TARGETS)}")
    device = "cuda" if args.gpus_per_actor > 0 else "cpu"
    work = Path(args.work)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    from cluster.ray_init import PRELOAD, init_ray
    from jobs.score import ScoreConfig, run

    gpu = f", {torch.cuda.get_device_name(0)}" if device == "cuda" else ""
    print(f"machine: {os.cpu_count()} CPUs{gpu}; torch {torch.__version__}; {args.rows:,} rows a set")
    models: dict[tuple[int, int], tuple[str, GradConDetector]] = {}  # one per image shape
    init_ray("local", log_to_driver=False, _system_config={"preload_python_modules": PRELOAD})
    rows = ["| set | job | first results | after them | decode ceiling (1 process x CPUs) | scorer alone | target "
            "| job / target |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for kind in kinds:
        data = image_set(kind, work, args.rows, args.mnist)
        if SHAPES[kind] not in models:
            models[SHAPES[kind]] = fitted(SHAPES[kind], data, work, device, args.fit_images)
        model, det = models[SHAPES[kind]]
        decode_ceiling, scorer_ceiling = ceilings(det, data, device, args.ceiling_images)
        out = work / f"out-{kind}"
        shutil.rmtree(out, ignore_errors=True)
        batch_size = args.batch_size or (512 if kind == "jpeg128" else 2048)
        summary = run(ScoreConfig(checkpoint=model, input=str(data), output=str(out), batch_size=batch_size,
                                  gpus_per_actor=args.gpus_per_actor, concurrency=args.concurrency, quiet=True))
        left = summary["seconds"] - summary["first_results_s"]
        after = args.rows / left if left > 0 else float("nan")  # (nan: the first results were the last)
        target = TARGETS[kind]
        print(f"{kind}: {args.rows:,} rows  job {summary['images_per_s']:>9,.0f} images/s  "
              f"(first results after {summary['first_results_s']:.1f} s, then ~{after:,.0f} images/s)  "
              f"ceilings: decode {decode_ceiling:,.0f} images/s ({os.cpu_count()} CPUs), "
              f"scorer {scorer_ceiling:,.0f} images/s  target {target:,}: job / target = "
              f"{summary['images_per_s'] / target:.2f}  stages s {summary['stages_s']}", flush=True)
        rows.append(f"| {kind}, {args.rows:,} rows | {summary['images_per_s']:,.0f} | {summary['first_results_s']} s | "
                    f"{after:,.0f} | {decode_ceiling:,.0f} | {scorer_ceiling:,.0f} | {target:,} | "
                    f"{summary['images_per_s'] / target:.2f} |")
    print("\n".join(rows))
    if args.write_docs:
        publish(f"score-targets-{device}", f"The score job against its targets and ceilings ({device.upper()})",
                "\n".join(rows))


if __name__ == "__main__":
    main()
