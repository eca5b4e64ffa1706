"""Write an image set (parquet, PNG-encoded images; columns id, image, label, split) from a source.

gradcon prepare mnist --source data/mnist --out data/sets/mnist
gradcon prepare fashion-mnist --source /usr/share/datasets/fashion-mnist --out s3://bucket/fmnist/
gradcon prepare cifar10 --source cifar-10-batches-py --out data/sets/cifar10
gradcon prepare folder --source photos/ --out data/sets/photos  (one subfolder per class; train/ test/ optional)
gradcon prepare parquet --source hf.parquet --out data/sets/x      (re-encode an existing parquet / HF export)

Re-running with the same input writes identical files.
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from cluster.storage import S3Options, filesystem_for
from gradcon_core.imageset import ImageSetWriter
from gradcon_core.sources import SOURCES, tables


def prepare(kind: str, source: str, out: str, rows_per_file: int = 20000, download: bool = False,
            options: S3Options | None = None) -> list[str]:
    options = options or S3Options.from_env()
    fs, _ = filesystem_for(out, options)
    source_fs = filesystem_for(source, options)[0] if kind == "parquet" else None
    writer = ImageSetWriter(out, rows_per_file, fs)
    with tqdm(desc=f"prepare {kind}", unit=" images", file=sys.stderr, disable=None) as bar:
        for table in tables(kind, source, source_fs, download):
            writer.write(table)
            bar.update(table.num_rows)
    return writer.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=SOURCES)
    parser.add_argument("--source", required=True, help="IDX folder, cifar-10-batches-py/, image folder or parquet")
    parser.add_argument("--out", required=True, help="local folder, file:// or s3:// prefix")
    parser.add_argument("--rows-per-file", type=int, default=20000)
    parser.add_argument("--download", action="store_true", help="mnist/fashion-mnist: fetch with torchvision")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


def main(args: argparse.Namespace) -> int:
    paths = prepare(args.kind, args.source, args.out, args.rows_per_file, args.download,
                    S3Options.from_env(endpoint=args.s3_endpoint))
    print(f"wrote {len(paths)} file(s) under {args.out}")
    return 0

