"""gradcon report: the static HTML report of a result table (gradcon_core.results.report, jobs/report.py)."""
from __future__ import annotations

import io
import logging
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from gradcon_core.data.images import encode_png
from gradcon_core.data.imageset import write_image_set
from gradcon_core.detectors.registry import create_detector
from gradcon_core.metrics import evaluate
from gradcon_core.results.report import build_report, read_images
from gradcon_core.results.scan import ROW_SCHEMA, RunningSelection, scan_results
from gradcon_core.results.table import SCHEMA, result_rows
from jobs.cli import main as cli_main

GHOSTS = ["ghost-1", "ghost-2"]  # result rows whose ids are not in the image set


class Page(HTMLParser):
    """Every tag and the files a page references."""

    def __init__(self):
        super().__init__()
        self.tags, self.refs, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]

    def handle_data(self, data):
        self.text.append(data)


def parse(path: Path) -> Page:
    page = Page()
    page.feed(path.read_text())
    page.close()
    return page


@pytest.fixture(scope="module")
def detector(mnist_train):
    x, y = mnist_train
    torch.manual_seed(0)
    det = create_detector("cae", in_channels=1, device="cpu")
    return det.fit(x[y == 1][:400], epochs=1, batch_size=64, x_val=x[y == 1][400:500])


@pytest.fixture(scope="module")
def image_set(tmp_path_factory, mnist_test) -> tuple[Path, pa.Table]:
    """300 MNIST test digits (1 normal) in 3 files, 3 of them corrupt."""
    x, y = mnist_test
    n = 300
    blobs = [encode_png(img) for img in x[:n]]
    for k in (5, 77, 150):
        blobs[k] = b"not an image"
    table = pa.table({"id": [f"test-{i:06d}" for i in range(n)], "image": pa.array(blobs, pa.binary()),
                      "label": pa.array(y[:n], pa.int64()), "is_anomaly": pa.array(y[:n] != 1)})
    root = tmp_path_factory.mktemp("sets") / "mnist-test"
    write_image_set(str(root), table, rows_per_file=100)
    return root, table


def write_results(detector, table: pa.Table, folder: Path, labels: bool = True, ghosts: bool = True) -> Path:
    """The result table gradcon score would write (2 files), plus ghost rows with the highest scores."""
    folder.mkdir(parents=True, exist_ok=True)
    passthrough = ["label", "is_anomaly"] if labels else []
    half = table.num_rows // 2
    for k, part in enumerate((table.slice(0, half), table.slice(half))):
        rows = result_rows(detector, part.column("id").to_pylist(), part.column("image").to_pylist(),
                           detector.threshold_, "model-x", {c: part.column(c) for c in passthrough})
        if ghosts and k == 1:
            extra = {f.name: pa.nulls(len(GHOSTS), f.type) for f in SCHEMA}
            extra.update(id=pa.array(GHOSTS), score=pa.array([9.0, 8.0], pa.float32()),
                         threshold=pa.array([detector.threshold_] * 2), is_anomaly=pa.array([True, True]))
            rows = pa.concat_tables([rows, pa.table(extra, schema=SCHEMA)])
        pq.write_table(rows, folder / f"part-{k:05d}.parquet")
    (folder / "_summary.json").write_text("{}")
    return folder


@pytest.fixture(scope="module")
def results(detector, image_set, tmp_path_factory) -> Path:
    return write_results(detector, image_set[1], tmp_path_factory.mktemp("scores") / "run")


@pytest.fixture(scope="module")
def report(detector, image_set, results, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    return build_report(str(results), str(out), images=str(image_set[0]), detector=detector, checkpoint="ckpt",
                        top_k=10, normal_sample=6, seed=3), out


def test_detector_reconstruct_contract(detector, mnist_test):
    x = mnist_test[0][:5]
    recon = detector.reconstruct(x)
    assert recon.shape == (5, 1, 28, 28) and recon.dtype == np.float32
    with torch.no_grad():
        expected = detector.model(torch.from_numpy(x[:, None].astype(np.float32) / 255)).numpy()
    np.testing.assert_allclose(recon, expected, atol=1e-6)
    assert create_detector("deep_svdd", in_channels=1, device="cpu").reconstruct(x) is None  # codes, not images
    assert create_detector("ocsvm", in_channels=1).reconstruct(x) is None  # no network


def test_html_parses_and_every_image_exists(report):
    result, out = report
    page = parse(out / "index.html")
    assert page.tags[:2] == ["html", "head"] and "body" in page.tags
    assert not any(r.startswith(("http:", "https:", "//")) for r in page.refs), "the report must work offline"
    assert "script" not in page.tags and "link" not in page.tags  # inline CSS, nothing fetched
    images = [r for r in page.refs if r.endswith(".png")]
    assert {"plots/histogram.png", "plots/roc.png", "plots/pr.png"} <= set(images)
    for ref in images:
        assert (out / ref).is_file(), ref
        Image.open(out / ref).verify()
    assert set(result.files) == {*images, "index.html"}  # nothing written that the page does not show
    assert 0.5 < result.metrics["auroc"] <= 1 and 0 < result.metrics["aupr"] <= 1


def test_metrics_are_those_of_evaluate(report, results):
    result, _ = report
    table = pq.read_table(results).filter(pc.is_valid(pc.field("is_anomaly_true")) & pc.is_valid(pc.field("score")))
    truth = table.column("is_anomaly_true").to_numpy(zero_copy_only=False)
    expected = evaluate(table.column("score").to_numpy(), truth, result.scan.threshold)
    assert result.metrics == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_top_k_are_the_k_highest_scores(report, results):
    result, _ = report
    table = pq.read_table(results, columns=["id", "score"])
    scores = table.column("score").drop_null().to_numpy()
    expected = np.sort(scores)[::-1][:10]
    shown = [c.row["score"] for c in result.top]
    np.testing.assert_array_equal(shown, expected)
    assert [c.row["id"] for c in result.top[:2]] == GHOSTS


def test_heat_maps_have_the_image_size(report, detector):
    result, out = report
    pictured = [c for c in result.top + result.normal if c.files]
    assert len(pictured) >= 10
    for card in pictured:
        assert set(card.files) == {"input", "reconstruction", "error"}
        sizes = {kind: Image.open(out / path).size for kind, path in card.files.items()}
        assert set(sizes.values()) == {tuple(detector.input_size)[::-1]}, sizes
        assert Image.open(out / card.files["error"]).mode == "RGB"


def test_missing_ids_are_said_once_and_listed_without_pictures(detector, image_set, results, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="gradcon"):
        result = build_report(str(results), str(tmp_path), images=str(image_set[0]), detector=detector, top_k=5)
    warnings = [r for r in caplog.records if "not in" in r.getMessage()]
    assert len(warnings) == 1 and "ghost-1" in warnings[0].getMessage()
    assert result.missing_ids == GHOSTS
    ghosts = [c for c in result.top if c.row["id"] in GHOSTS]
    assert [c.problem for c in ghosts] == ["not in the image set"] * 2 and not any(c.files for c in ghosts)
    assert "ghost-1" in (tmp_path / "index.html").read_text()


def test_error_rows_are_listed_not_shown(report, image_set):
    result, out = report
    bad = {f"test-{k:06d}" for k in (5, 77, 150)}
    assert result.scan.errors == {"undecodable image": 3}
    assert {i for i, _ in result.scan.error_rows} == bad
    assert not bad & {c.row["id"] for c in result.top + result.normal}
    text = "".join(parse(out / "index.html").text)
    assert all(i in text for i in bad) and "undecodable image" in text


def test_normal_sample_is_seeded_and_below_the_threshold(report, results, detector, tmp_path):
    result, _ = report
    ids = [c.row["id"] for c in result.normal]
    assert len(ids) == 6 and all(c.row["is_anomaly"] is False for c in result.normal)
    again = build_report(str(results), str(tmp_path / "a"), top_k=0, normal_sample=6, seed=3)
    other = build_report(str(results), str(tmp_path / "b"), top_k=0, normal_sample=6, seed=4)
    assert [c.row["id"] for c in again.normal] == ids
    assert [c.row["id"] for c in other.normal] != ids


def test_running_selection_matches_a_full_sort_with_ties_across_batches():
    rng = np.random.default_rng(0)
    keys = rng.integers(0, 50, 2000).astype(np.float64)  # many ties
    keys[rng.random(2000) < 0.1] = np.nan  # rows that may not be selected
    table = pa.table({f.name: pa.array([str(i) for i in range(2000)]) if f.name == "id" else pa.nulls(2000, f.type)
                      for f in ROW_SCHEMA}, schema=ROW_SCHEMA)
    selection = RunningSelection(37)
    for start in range(0, 2000, 128):
        selection.offer(keys[start:start + 128], table.slice(start, 128), start)
    order = sorted((i for i in range(2000) if not np.isnan(keys[i])), key=lambda i: (-keys[i], i))[:37]
    assert selection.rows.column("id").to_pylist() == [str(i) for i in order]


def test_table_without_labels_has_no_curves(detector, image_set, tmp_path):
    results = write_results(detector, image_set[1], tmp_path / "scores", labels=False)
    result = build_report(str(results), str(tmp_path / "report"), images=str(image_set[0]), top_k=4,
                          normal_sample=2)
    assert result.metrics == {}
    assert (tmp_path / "report/plots/histogram.png").is_file()
    assert not (tmp_path / "report/plots/roc.png").exists()
    assert "no ground truth" in (tmp_path / "report/index.html").read_text()
    # No model: the images at their own size, no reconstruction or heat map.
    assert all(set(c.files) == {"input"} for c in result.top if c.files)


def test_without_a_threshold_the_normal_sample_is_any_scored_row_outside_the_top(detector, image_set, tmp_path):
    results = write_results(detector, image_set[1], tmp_path / "scores", ghosts=False)
    for path in results.glob("*.parquet"):
        table = pq.read_table(path)
        for name in ("is_anomaly", "threshold"):
            i = table.schema.get_field_index(name)
            table = table.set_column(i, name, pa.nulls(table.num_rows, table.schema.field(i).type))
        pq.write_table(table, path)
    result = build_report(str(results), str(tmp_path / "report"), top_k=20, normal_sample=8)
    assert not result.scan.normal_by_threshold and result.scan.threshold is None
    assert not {c.row["id"] for c in result.top} & {c.row["id"] for c in result.normal}
    assert len(result.normal) == 8
    assert "no threshold" in (tmp_path / "report/index.html").read_text()


def test_text_from_the_table_is_escaped(tmp_path):
    hostile = ["<script>alert(1)</script>", '<img src="x.png">', "plain"]
    columns = {f.name: pa.nulls(3, f.type) for f in SCHEMA}
    columns.update(id=pa.array(hostile), score=pa.array([0.5, None, 0.1], pa.float32()),
                   error=pa.array([None, "<b>bad</b> (detail)", None]), model_id=pa.array(["<i>a</i>", None, "b"]))
    (tmp_path / "scores").mkdir()
    pq.write_table(pa.table(columns, schema=SCHEMA), tmp_path / "scores/part-00000.parquet")
    build_report(str(tmp_path / "scores"), str(tmp_path / "report"), top_k=3, normal_sample=3)
    page = parse(tmp_path / "report/index.html")
    assert not {"script", "i"} & set(page.tags) and "x.png" not in page.refs  # the page itself uses <b>
    text = "".join(page.text)
    assert all(h in text for h in hostile) and "<b>bad</b>" in text and "<i>a</i>" in text


def test_empty_table(tmp_path):
    (tmp_path / "scores").mkdir()
    pq.write_table(SCHEMA.empty_table(), tmp_path / "scores/part-00000.parquet")
    result = build_report(str(tmp_path / "scores"), str(tmp_path / "report"))
    assert result.scan.rows == 0 and result.top == [] and result.normal == []
    page = parse(tmp_path / "report/index.html")
    assert "No scored rows" in "".join(page.text) and not [r for r in page.refs if r.endswith(".png")]


def test_not_a_result_table(tmp_path, image_set):
    with pytest.raises(ValueError, match="not a result table"):
        scan_results(str(image_set[0]))


def test_read_images_by_id_and_by_row_number(image_set, tmp_path):
    root, table = image_set
    got = read_images(str(root), ["test-000123", "test-000299", "nope"])
    assert set(got) == {"test-000123", "test-000299"}
    assert got["test-000123"] == table.column("image")[123].as_py()
    pq.write_table(table.drop_columns(["id"]), tmp_path / "noid.parquet", row_group_size=50)  # ids "<file>:<row>"
    got = read_images(str(tmp_path / "noid.parquet"), ["noid.parquet:7", "noid.parquet:260", "noid.parquet:999"])
    assert got == {"noid.parquet:7": table.column("image")[7].as_py(),
                   "noid.parquet:260": table.column("image")[260].as_py()}


def test_integer_ids_in_the_image_set(tmp_path, mnist_test):
    x = mnist_test[0][:20]
    write_image_set(str(tmp_path / "set"), pa.table({"id": pa.array(range(20), pa.int64()),
                                                     "image": [encode_png(i) for i in x]}))
    assert set(read_images(str(tmp_path / "set"), ["3", "19", "x"])) == {"3", "19"}


@pytest.mark.slow
def test_gradcon_report_command_on_s3(detector, image_set, results, s3_server, tmp_path, capsys, monkeypatch):
    from cluster.storage import s3_filesystem

    fs = s3_filesystem(s3_server)
    write_image_set("gradcon-test/report/set", image_set[1], rows_per_file=100, filesystem=fs)
    for name in ("part-00000.parquet", "part-00001.parquet"):
        with fs.open_output_stream(f"gradcon-test/report/scores/{name}") as f:
            f.write((results / name).read_bytes())
    detector.save("gradcon-test/report/ckpt", filesystem=fs)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    code = cli_main(["report", "results=s3://gradcon-test/report/scores", "images=s3://gradcon-test/report/set",
                     "checkpoint=s3://gradcon-test/report/ckpt", f"out={tmp_path / 'r'}", "top_k=4",
                     "normal_sample=2", f"s3_endpoint={s3_server.endpoint}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"report: {tmp_path / 'r' / 'index.html'}" in printed and "AUROC" in printed
    assert len(list((tmp_path / "r/images").glob("*-error.png"))) == 2 + 2  # 4 top minus 2 ghosts, 2 normal
    assert cli_main(["report", f"results={tmp_path / 'nothing'}", f"out={tmp_path / 'x'}"]) == 2
    assert cli_main(["report", f"out={tmp_path / 'x'}"]) == 2


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian's chromium is not installed")
def test_report_renders_in_headless_chromium(report, tmp_path):
    _, out = report
    shot = tmp_path / "report.png"
    subprocess.run(["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1280,2400", "--hide-scrollbars",
                    f"--screenshot={shot}", (out / "index.html").as_uri()],
                   check=True, capture_output=True, timeout=120)
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
    assert pixels.shape[:2] == (2400, 1280)
    # The gallery's images were loaded from disk: their black backgrounds and white digits are on the page.
    dark = (pixels.sum(axis=2) < 60).mean()
    assert dark > 0.01, f"only {dark:.4f} of the page is dark: the images did not load"


def test_counts_match_the_table(report, results):
    result, _ = report
    table = pq.read_table(results)
    assert result.scan.rows == table.num_rows
    assert result.scan.anomalies == pc.sum(table.column("is_anomaly")).as_py()
    assert len(result.scan.scores) == table.column("error").null_count  # scored = rows without an error
