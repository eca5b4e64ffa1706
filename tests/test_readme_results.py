"""The "Results in DuckDB and pandas" code blocks of docs/commands.md, run as written: locally and on S3 (moto)."""
from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from gradcon_core.data.images import encode_png
from gradcon_core.data.imageset import write_image_set
from gradcon_core.results.table import SCHEMA

README = Path(__file__).resolve().parents[1] / "docs" / "commands.md"
SECTION = "## Results in DuckDB and pandas"
ROWS = 200
ERRORS = {17: "undecodable image (UnidentifiedImageError: cannot identify image file)", 60: "empty image bytes",
          123: "undecodable image (OSError: truncated)"}


def readme_blocks() -> list[str]:
    text = README.read_text()
    assert SECTION in text, f"{README.name} has no section {SECTION!r}"
    section = text.split(SECTION, 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, flags=re.S)


def run_blocks(blocks: list[str], namespace: dict) -> dict:
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    return namespace


@pytest.fixture(scope="module")
def tables(mnist_test) -> tuple[pa.Table, pa.Table, list[str]]:
    """(result table, image set, ids of the 10 highest-scored rows without an error)."""
    x, y = mnist_test
    rng = np.random.default_rng(0)
    ids = [f"test-{i:06d}" for i in range(ROWS)]
    score = rng.random(ROWS).astype(np.float32)
    failed = np.isin(np.arange(ROWS), list(ERRORS))
    columns = {f.name: pa.nulls(ROWS, f.type) for f in SCHEMA}
    columns.update(id=pa.array(ids), score=pa.array(score, mask=failed), recon_error=pa.array(score, mask=failed),
                   is_anomaly=pa.array(score > 0.8, mask=failed), threshold=pa.array(np.full(ROWS, 0.8)),
                   error=pa.array([ERRORS.get(i) for i in range(ROWS)], pa.string()),
                   label=pa.array(y[:ROWS], pa.int64()), is_anomaly_true=pa.array(y[:ROWS] != 1))
    results = pa.table(columns, schema=SCHEMA)
    images = pa.table({"id": ids, "image": pa.array([encode_png(img) for img in x[:ROWS]], pa.binary()),
                       "label": pa.array(y[:ROWS], pa.int64())})
    order = [i for i in np.argsort(-score, kind="stable") if not failed[i]]
    return results, images, [ids[i] for i in order[:10]]


def write_results(table: pa.Table, write) -> None:
    """As gradcon score writes it: one file per input file and _summary.json."""
    for k, part in enumerate((table.slice(0, ROWS // 2), table.slice(ROWS // 2))):
        buf = io.BytesIO()
        pq.write_table(part, buf)
        write(f"part-{k:05d}.parquet", buf.getvalue())
    write("_summary.json", b'{"rows": 200}')


def test_readme_blocks_run_on_local_files(tables, tmp_path, monkeypatch, mnist_test):
    results, images, top10 = tables
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "runs/demo/results"
    folder.mkdir(parents=True)
    write_results(results, lambda name, data: (folder / name).write_bytes(data))
    write_image_set("runs/demo/store/sets/mnist-test", images, rows_per_file=64)
    local = [b for b in readme_blocks() if "s3://" not in b]
    assert len(local) == 2
    ns = run_blocks(local, {})

    assert ns["top"]["id"].tolist() == top10
    assert dict(zip(ns["errors"]["outcome"], ns["errors"]["rows"])) == {
        "scored": ROWS - 3, "undecodable image": 2, "empty image bytes": 1}
    for image_id in top10[:5]:  # the joined images, written by the block, are the set's pixels
        pixels = np.asarray(Image.open(tmp_path / f"{image_id}.png"))
        np.testing.assert_array_equal(pixels, mnist_test[0][int(image_id.split("-")[1])])
    assert ns["most_anomalous"]["id"].tolist() == top10
    assert ns["error_kinds"].to_dict() == {"undecodable image": 2, "empty image bytes": 1}
    assert int(ns["confusion"].to_numpy().sum()) == ROWS - 3
    assert sorted(ns["pictures"]["id"]) == sorted(top10)


@pytest.mark.slow
def test_readme_blocks_run_on_s3(tables, s3_server, monkeypatch):
    from cluster.storage import s3_filesystem

    results, images, top10 = tables
    fs = s3_filesystem(s3_server, allow_bucket_creation=True)
    fs.create_dir("my-bucket")

    def put(name: str, data: bytes) -> None:
        with fs.open_output_stream(f"my-bucket/scores/run1/{name}") as f:
            f.write(data)

    write_results(results, put)
    write_image_set("my-bucket/sets/mnist-test", images, rows_per_file=64, filesystem=fs)
    for name, value in (("AWS_ENDPOINT_URL", s3_server.endpoint), ("AWS_ACCESS_KEY_ID", s3_server.access_key),
                        ("AWS_SECRET_ACCESS_KEY", s3_server.secret_key), ("AWS_REGION", s3_server.region)):
        monkeypatch.setenv(name, value)
    on_s3 = [b for b in readme_blocks() if "s3://" in b]
    assert len(on_s3) == 1
    ns = run_blocks(on_s3, {})

    assert ns["top_s3"]["id"].tolist() == top10
    assert ns["error_kinds_s3"].to_dict() == {"undecodable image": 2, "empty image bytes": 1}
    assert sorted(ns["pictures_s3"].column("id").to_pylist()) == sorted(top10)
