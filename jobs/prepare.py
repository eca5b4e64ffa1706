"""Write an image set (parquet; columns id, image, label, split, ...) from a source.

gradcon prepare mnist --source data/mnist --out data/sets/mnist
gradcon prepare fashion-mnist --source /usr/share/datasets/fashion-mnist --out s3://bucket/fmnist/
gradcon prepare cifar10 --source cifar-10-batches-py --out data/sets/cifar10
gradcon prepare folder --source photos/ --out data/sets/photos  (one subfolder per class; train/ test/ optional)
gradcon prepare parquet --source hf.parquet --out data/sets/x      (re-encode an existing parquet / HF export)
gradcon prepare defects --image-size 128 --out data/sets/defects  (generated RGB textures with defects)

--encoding raw stores uint8 pixels instead of PNG (gradcon_core/data/images.py), which scoring reads with no decoding.
--image-size S (or HxW) resizes every image to that size, stored as PNG; without it folder and parquet images
keep their bytes (a JPEG stays that JPEG). When every image has one known shape (mnist, cifar10, defects, any
resized set) the files record it, and train, eval, tune and demo size their networks by it
(gradcon_core/data/imageset.py). Re-running with the same input writes identical files.
"""
from __future__ import annotations

import argparse
import sys

from tqdm import tqdm

from cluster.storage import S3Options, check_reachable, check_readable, filesystem_for
from gradcon_core.data.defects import CLASSES, DEFAULT_COUNTS, DefectCounts
from gradcon_core.data.imageset import ImageSetWriter, check_image_set
from gradcon_core.data.sizes import ImageSize
from gradcon_core.data.sources import ENCODINGS, KNOWN_DATASETS, SOURCES, Resizer, known_shape, tables


def prepare(kind: str, source: str | None, out: str, rows_per_file: int = 20000, download: bool = False,
            options: S3Options | None = None, image_size: ImageSize | None = None, seed: int = 0,
            counts: DefectCounts = DEFAULT_COUNTS, classes: tuple[str, ...] = CLASSES,
            encoding: str = "png") -> list[str]:
    """Write the set; image_size: resize to it (defects: generate at it); seed, counts, classes: the defects
    set's (gradcon_core/data/defects.py); encoding: png, or raw (uint8 pixels, no decoding when scored; needs one
    known size)."""
    if encoding not in ENCODINGS:
        raise ValueError(f"unknown encoding {encoding!r}; choose one of {sorted(ENCODINGS)}")
    if encoding == "raw" and image_size is None and known_shape(kind) is None:
        raise ValueError(f"--encoding raw stores every image at one size, and {kind} images have sizes of their "
                         "own: give --image-size")
    options = options or S3Options.from_env()
    check_reachable(out, options)  # bad credentials: a clear error before any work
    source_fs = None
    if kind == "parquet" and source is not None:
        check_readable(source, options)
        source_fs = filesystem_for(source, options)[0]
        check_image_set(source, source_fs)
    fs, _ = filesystem_for(out, options)
    shape = known_shape(kind, image_size)
    resize = None
    if encoding != "png" or (image_size is not None and kind != "defects"):  # decoded, resized, stored again
        resize = Resizer(shape.image_size if shape else image_size, shape and shape.channels, encoding)
    writer = ImageSetWriter(out, rows_per_file, fs, shape, dataset=kind if kind in KNOWN_DATASETS else None)
    with tqdm(desc=f"prepare {kind}", unit=" images", file=sys.stderr, disable=None) as bar:
        for table in tables(kind, source, source_fs, download, image_size, seed, counts, classes):
            if resize:
                table = resize(table)
                writer.shape = resize.shape  # known once an image has decoded
            writer.write(table)
            bar.update(table.num_rows)
    if resize:
        resize.report()
    return writer.close()


def image_size_argument(text: str) -> int | tuple[int, int]:
    """"64" (square) or "48x64" (height x width)."""
    try:
        sides = tuple(int(s) for s in text.lower().split("x"))
    except ValueError:
        sides = ()
    if len(sides) not in (1, 2) or min(sides) < 1:
        raise argparse.ArgumentTypeError(f"an image size is S or HxW in pixels (e.g. 64 or 48x64), got {text!r}")
    return sides[0] if len(sides) == 1 else sides


def counts_argument(text: str) -> DefectCounts:
    try:
        train, test_normal, test_defective = (int(n) for n in text.split(","))
        return DefectCounts(train, test_normal, test_defective)
    except ValueError:
        raise argparse.ArgumentTypeError(f"counts are TRAIN,TEST_NORMAL,TEST_DEFECTIVE (e.g. 200,40,40), "
                                         f"got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("kind", choices=SOURCES)
    parser.add_argument("--source", help="IDX folder, cifar-10-batches-py/, image folder or parquet (not for defects)")
    parser.add_argument("--out", required=True, help="local folder, file:// or s3:// prefix")
    parser.add_argument("--image-size", type=image_size_argument,
                        help="resize every image to S or HxW pixels (defects: generate at it; default 128)")
    parser.add_argument("--seed", type=int, default=0, help="defects: the generator's seed")
    parser.add_argument("--counts", type=counts_argument, default=DEFAULT_COUNTS,
                        help="defects: images per texture kind: TRAIN,TEST_NORMAL,TEST_DEFECTIVE (default 200,40,40)")
    parser.add_argument("--classes", type=lambda text: tuple(text.split(",")), default=CLASSES,
                        help=f"defects: texture kinds, comma-separated (default {','.join(CLASSES)})")
    parser.add_argument("--encoding", choices=sorted(ENCODINGS), default="png",
                        help="raw: uint8 pixels, scored with no decoding (one size: the source's or --image-size)")
    parser.add_argument("--rows-per-file", type=int, default=20000)
    parser.add_argument("--download", action="store_true", help="mnist/fashion-mnist: fetch with torchvision")
    parser.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS_ENDPOINT_URL or AWS)")


def main(args: argparse.Namespace) -> int:
    paths = prepare(args.kind, args.source, args.out, args.rows_per_file, args.download,
                    S3Options.from_env(endpoint=args.s3_endpoint), args.image_size, args.seed, args.counts,
                    args.classes, args.encoding)
    print(f"wrote {len(paths)} file(s) under {args.out}")
    return 0
