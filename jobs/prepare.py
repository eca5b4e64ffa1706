"""Write an image set (parquet; columns id, image, label, split, ...) from a source.

gradcon prepare mnist source=data/mnist out=data/sets/mnist
gradcon prepare fashion-mnist source=/usr/share/datasets/fashion-mnist out=s3://bucket/fmnist/
gradcon prepare cifar10 source=cifar-10-batches-py out=data/sets/cifar10
gradcon prepare folder source=photos/ out=data/sets/photos  (one subfolder per class; train/ test/ optional)
gradcon prepare parquet source=hf.parquet out=data/sets/x     (re-encode an existing parquet / HF export)
gradcon prepare defects image_size=128 out=data/sets/defects  (generated RGB textures with defects)

encoding=raw stores uint8 pixels instead of PNG (gradcon_core/data/images.py), which scoring reads with no
decoding. image_size=S (or HxW) resizes every image to that size, stored as PNG; without it folder and parquet
images keep their bytes (a JPEG stays that JPEG). When every image has one known shape (mnist, cifar10,
defects, any resized set) the files record it, and train, eval, tune and demo size their networks by it
(gradcon_core/data/imageset.py). Re-running with the same input writes identical files.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field

from tqdm import tqdm

from cluster.storage import S3Options, check_reachable, check_readable, filesystem_for
from gradcon_core.config import Config, bounded, local_path
from gradcon_core.data.defects import CLASSES, DEFAULT_COUNTS, DefectCounts
from gradcon_core.data.imageset import ImageSetWriter, check_image_set
from gradcon_core.data.sizes import ImageSize, as_hw
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
        raise ValueError(f"encoding=raw stores every image at one size, and {kind} images have sizes of their "
                         "own: give image_size=")
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


WORDS = ("kind",)  # gradcon prepare KIND key=value ...


@dataclass
class PrepareConfig(Config):
    kind: str = ""  # the source: mnist, fashion-mnist, cifar10, folder, parquet or defects
    source: str | None = local_path(None)  # IDX folder, cifar-10-batches-py/, image folder or parquet (not defects)
    out: str = local_path("")  # the image set: a local folder, file:// or s3:// prefix
    image_size: list[int] | None = bounded(None, at_least=1)  # resize to S or HxW (defects: generate at it; 128)
    encoding: str = "png"  # or raw: uint8 pixels, scored with no decoding (one size: the source's or image_size)
    rows_per_file: int = bounded(20000, at_least=1)
    seed: int = 0  # defects: the generator's seed
    counts: list[int] = field(default_factory=lambda: [200, 40, 40])  # defects: TRAIN,TEST_NORMAL,TEST_DEFECTIVE
    classes: list[str] = field(default_factory=lambda: list(CLASSES))  # defects: the texture kinds
    download: bool = False  # mnist, fashion-mnist: fetch with torchvision
    s3_endpoint: str | None = None  # default: AWS_ENDPOINT_URL, else AWS

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.kind not in SOURCES:
            raise ValueError(f"name the source: gradcon prepare KIND out=..., KIND one of {', '.join(SOURCES)}"
                             + (f" (got {self.kind!r})" if self.kind else ""))
        if not self.out:
            raise ValueError("prepare needs out= (the image set to write)")
        if self.encoding not in ENCODINGS:
            raise ValueError(f"config encoding: must be one of {', '.join(sorted(ENCODINGS))}, got {self.encoding!r}")
        if len(self.counts) != 3:
            raise ValueError(f"config counts: TRAIN,TEST_NORMAL,TEST_DEFECTIVE (e.g. 200,40,40), got {self.counts}")
        if self.image_size is not None:
            as_hw(self.image_size[0] if len(self.image_size) == 1 else self.image_size)


Config = PrepareConfig


def run(cfg: PrepareConfig) -> list[str]:
    size = cfg.image_size and (cfg.image_size[0] if len(cfg.image_size) == 1 else tuple(cfg.image_size))
    paths = prepare(cfg.kind, cfg.source, cfg.out, cfg.rows_per_file, cfg.download,
                    S3Options.from_env(endpoint=cfg.s3_endpoint), size, cfg.seed, DefectCounts(*cfg.counts),
                    tuple(cfg.classes), cfg.encoding)
    print(f"wrote {len(paths)} file(s) under {cfg.out}")
    return paths
