"""Image sets: prepare -> read back, layouts, many files, S3, bad input."""
import io

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from cluster.storage import S3Options, StorageError, check_readable, filesystem_for, storage_failure
from gradcon_core import GradConDetector, create_model, load_detector
from gradcon_core.data.images import decode_image, decode_images, encode_png
from gradcon_core.data.imageset import (
    ImageShape,
    iter_batches,
    read_columns,
    recorded_shape,
    row_groups,
    take_rows,
    write_image_set,
)
from jobs.prepare import prepare


def _read_all(uri, fs=None):
    meta = read_columns(uri, ["label", "split"], filesystem=fs)
    rows = take_rows(uri, np.arange(meta.num_rows), filesystem=fs)
    pixels, errors = decode_images(rows.images, 1, (28, 28))
    assert not any(errors)
    return pixels[..., 0], rows.labels, meta.column("split").to_pylist(), rows.ids


def test_prepare_round_trip_is_pixel_exact_and_idempotent(small_mnist_idx, mnist_train, mnist_test, tmp_path):
    out = tmp_path / "set"
    paths = prepare("mnist", str(small_mnist_idx), str(out), rows_per_file=120)
    assert len(paths) == 5  # 500 rows / 120 per file
    pixels, labels, splits, ids = _read_all(str(out))
    np.testing.assert_array_equal(pixels[:300], mnist_train[0][:300])
    np.testing.assert_array_equal(pixels[300:], mnist_test[0][:200])
    np.testing.assert_array_equal(labels, np.concatenate([mnist_train[1][:300], mnist_test[1][:200]]))
    assert splits == ["train"] * 300 + ["test"] * 200
    assert ids[0] == "train-000000" and ids[300] == "test-000000"
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    prepare("mnist", str(small_mnist_idx), str(out), rows_per_file=120)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Every file records the one shape of its images, for the jobs to size their networks by.
    assert {recorded_shape(str(p)) for p in out.iterdir()} == {ImageShape((28, 28), 1)}


def test_a_raw_encoded_set_scores_as_its_png_set_does(small_mnist_idx, tmp_path, mnist_train):
    """--encoding raw: the same rows, ids and pixels as the PNG set, so the same result table; RGB and resized
    too; a source of many sizes needs image_size=."""
    from gradcon_core.data.images import RAW_MAGIC
    from gradcon_core.results.table import result_rows

    prepare("mnist", str(small_mnist_idx), str(tmp_path / "png"))
    prepare("mnist", str(small_mnist_idx), str(tmp_path / "raw"), encoding="raw")
    png, raw = (take_rows(str(tmp_path / name), np.arange(500)) for name in ("png", "raw"))
    assert raw.ids == png.ids and all(image.startswith(RAW_MAGIC) for image in raw.images)
    assert recorded_shape(str(tmp_path / "raw")) == ImageShape((28, 28), 1)
    torch.manual_seed(0)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu").fit(mnist_train[0][:128], epochs=1)
    tables = [result_rows(det, rows.ids, rows.images, det.threshold_, "m") for rows in (png, raw)]
    assert tables[0].equals(tables[1])
    folder = tmp_path / "photos" / "a"
    folder.mkdir(parents=True)
    for i, size in enumerate([(20, 30), (40, 24)]):
        Image.fromarray(np.full((*size, 3), 60 * i, np.uint8)).save(folder / f"{i}.png")
    with pytest.raises(ValueError, match="give image_size="):
        prepare("folder", str(tmp_path / "photos"), str(tmp_path / "f"), encoding="raw")
    prepare("folder", str(tmp_path / "photos"), str(tmp_path / "f"), encoding="raw", image_size=16)
    pixels, errors = decode_images(take_rows(str(tmp_path / "f"), np.arange(2)).images, 3, (16, 16))
    assert errors == [None, None] and pixels[1].min() == pixels[1].max() == 60


def test_rerun_with_fewer_files_removes_stale_parts(small_mnist_idx, tmp_path):
    out = tmp_path / "set"
    prepare("mnist", str(small_mnist_idx), str(out), rows_per_file=100)
    prepare("mnist", str(small_mnist_idx), str(out), rows_per_file=250)
    assert sorted(p.name for p in out.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert read_columns(str(out), ["label"]).num_rows == 500


def test_many_files_read_in_stable_order_and_ids_default_to_file_and_row(tmp_path):
    table = pa.table({"image": [encode_png(np.full((28, 28), i, np.uint8)) for i in range(10)], "label": range(10)})
    write_image_set(str(tmp_path / "s"), table, rows_per_file=3)
    meta = read_columns(str(tmp_path / "s"), ["label"])
    assert meta.column("label").to_pylist() == list(range(10))
    assert meta.column("id").to_pylist()[:4] == ["part-00000.parquet:0", "part-00000.parquet:1",
                                                 "part-00000.parquet:2", "part-00001.parquet:0"]
    rows = take_rows(str(tmp_path / "s"), np.array([9, 0, 4]))
    assert [decode_image(b, 1, (28, 28))[0, 0, 0] for b in rows.images] == [9, 0, 4]


def test_row_groups_number_each_group_s_first_row_within_its_file(tmp_path):
    paths = []
    for name, rows in (("a", 7), ("b", 0), ("c", 4)):
        paths.append(str(tmp_path / f"{name}.parquet"))
        pq.write_table(pa.table({"image": [b"x"] * rows}), paths[-1], row_group_size=3)
    groups = row_groups(pafs.LocalFileSystem(), paths)
    assert [(path[-9:], g, start, rows) for path, g, start, rows, _ in groups] == [
        ("a.parquet", 0, 0, 3), ("a.parquet", 1, 3, 3), ("a.parquet", 2, 6, 1),
        ("b.parquet", 0, 0, 0),  # an empty file has one empty row group: its read task yields nothing
        ("c.parquet", 0, 0, 3), ("c.parquet", 1, 3, 1)]


def test_hugging_face_struct_layout_is_read_and_reencoded(tmp_path, mnist_train):
    images = [encode_png(img) for img in mnist_train[0][:5]]
    struct = pa.array([{"bytes": b, "path": f"{i}.png"} for i, b in enumerate(images)],
                      pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    pq.write_table(pa.table({"image": struct, "label": mnist_train[1][:5]}), tmp_path / "hf.parquet")
    rows = take_rows(str(tmp_path / "hf.parquet"), np.arange(5))
    assert rows.images == images
    prepare("parquet", str(tmp_path / "hf.parquet"), str(tmp_path / "ours"))
    again = next(iter_batches(str(tmp_path / "ours")))
    assert again.column("image").type == pa.binary() and again.column("image").to_pylist() == images
    assert again.column("split").to_pylist() == ["train"] * 5


def test_missing_image_column_is_named(tmp_path):
    pq.write_table(pa.table({"pixels": [b"x"], "label": [1]}), tmp_path / "bad.parquet")
    with pytest.raises(ValueError, match="no 'image' column"):
        take_rows(str(tmp_path / "bad.parquet"), np.array([0]))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_columns(str(tmp_path / "nothing-here"), ["label"])


def test_decode_policy_corrupt_resize_and_channels():
    ok = encode_png(np.arange(28 * 28, dtype=np.uint8).reshape(28, 28))
    rgb = encode_png(np.zeros((28, 28, 3), np.uint8))
    big = np.random.default_rng(0).integers(0, 256, (56, 40), dtype=np.uint8)
    pixels, errors = decode_images([ok, b"\x89PNG broken", rgb, encode_png(big), None], 1, (28, 28))
    assert errors[0] is None and errors[3] is None
    assert "undecodable" in errors[1] and "3 channel" in errors[2] and "empty" in errors[4]
    expected = np.asarray(Image.fromarray(big).resize((28, 28), Image.LANCZOS))
    np.testing.assert_array_equal(pixels[3, ..., 0], expected)  # documented resize policy: Lanczos
    assert not pixels[1].any()  # failed rows stay black, flagged by their error
    gray_as_rgb = decode_image(ok, 1, (28, 28))
    assert gray_as_rgb.shape == (28, 28, 1)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((28, 28, 4), np.uint8)).save(buf, format="PNG")
    assert decode_image(buf.getvalue(), 3, (28, 28)).shape == (28, 28, 3)  # alpha dropped


def test_image_set_and_checkpoint_on_moto_s3(s3_server, small_mnist_idx):
    uri = "s3://gradcon-test/sets/mnist"
    prepare("mnist", str(small_mnist_idx), uri, rows_per_file=200, options=s3_server)
    fs, _ = filesystem_for(uri, s3_server)
    pixels, labels, _, _ = _read_all(uri, fs)
    assert pixels.shape == (500, 28, 28) and len(labels) == 500
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    det.save("s3://gradcon-test/ckpt/a", filesystem=fs)
    loaded = load_detector("s3://gradcon-test/ckpt/a", filesystem=fs)
    np.testing.assert_array_equal(loaded.decision_function(pixels[:8]), det.decision_function(pixels[:8]))


def test_wrong_credentials_give_a_clear_error_without_the_secret(seaweed_s3, small_mnist_idx, monkeypatch):
    uri = "s3://gradcon-test/sets/small"
    prepare("mnist", str(small_mnist_idx), uri, options=seaweed_s3.options)
    check_readable(uri, seaweed_s3.options)
    wrong = S3Options(seaweed_s3.options.endpoint, seaweed_s3.options.access_key, "wrong-secret-4242", "us-east-1")
    with pytest.raises(StorageError) as err:
        check_readable(uri, wrong)
    assert "cannot read s3://gradcon-test/sets/small" in str(err.value) and "AWS_SECRET_ACCESS_KEY" in str(err.value)
    assert "wrong-secret-4242" not in str(err.value) and seaweed_s3.secret_key not in str(err.value)
    # prepare and train say the same before any work (rc 2 from the command line: StorageError).
    from jobs.train import TrainConfig, run

    for job in (lambda: prepare("mnist", str(small_mnist_idx), "s3://gradcon-test/sets/other", options=wrong),
                lambda: run(TrainConfig(data=uri, storage="s3://gradcon-test/runs"))):
        with monkeypatch.context() as env:
            env.setenv("AWS_ENDPOINT_URL", wrong.endpoint)
            env.setenv("AWS_ACCESS_KEY_ID", wrong.access_key)
            env.setenv("AWS_SECRET_ACCESS_KEY", wrong.secret_key)
            with pytest.raises(StorageError, match="cannot read s3://gradcon-test/") as err:
                job()
        assert "wrong-secret-4242" not in str(err.value)


def test_a_storage_failure_is_found_in_a_cut_job_message_and_redacted():
    """Ray Train's message carries cut snippets of the workers' tracebacks: the AWS line is looked for in each
    worker's own error and its causes too."""
    from ray.train import WorkerGroupError

    options = S3Options(endpoint="http://127.0.0.1:9", access_key="AKIA-test", secret_key="s3cr3t")
    aws = OSError("When reading information for key 'set/part-0.parquet' in bucket 'b': AWS Error "
                  "NETWORK_CONNECTION during HeadObject operation: curl code 7 (key AKIA-test, s3cr3t)")
    cause = RuntimeError("Failed to apply UDF transform after 1/1 attempts")
    cause.__cause__ = aws
    error = WorkerGroupError("[Rank 0 Error Snippet]:\n ... (Output truncated) ...", {0: cause, 1: cause})
    found = storage_failure(error, options)
    assert found.startswith("When reading information") and "NETWORK_CONNECTION" in found
    assert "s3cr3t" not in found
    assert storage_failure(WorkerGroupError("worker died", {0: RuntimeError("out of memory")}), options) is None


def test_folder_source_labels_by_sorted_class_name_and_keeps_splits(tmp_path, mnist_test):
    root = tmp_path / "photos"
    for split, offset in (("train", 0), ("test", 10)):
        for name, digit in (("cat", 3), ("ant", 7)):
            (root / split / name).mkdir(parents=True)
            for k in range(2):
                img = mnist_test[0][np.flatnonzero(mnist_test[1] == digit)[offset + k]]
                Image.fromarray(img).save(root / split / name / f"{k}.png")
    prepare("folder", str(root), str(tmp_path / "set"))
    meta = read_columns(str(tmp_path / "set"), ["label", "class_name", "split"])
    assert meta.column("id").to_pylist()[0] == "train/ant/0.png"
    assert meta.column("class_name").to_pylist() == ["ant", "ant", "cat", "cat"] * 2
    assert meta.column("label").to_pylist() == [0, 0, 1, 1] * 2
    assert meta.column("split").to_pylist() == ["train"] * 4 + ["test"] * 4
    assert recorded_shape(str(tmp_path / "set")) is None  # kept as they are: nothing says they share a size
    with pytest.raises(FileNotFoundError, match="no class subfolders"):
        prepare("folder", str(tmp_path / "set"), str(tmp_path / "again"))


def test_cifar10_batches_are_kept_rgb(tmp_path):
    import pickle

    rng = np.random.default_rng(0)
    src = tmp_path / "cifar-10-batches-py"
    src.mkdir()
    batches = {f"data_batch_{i}": 3 for i in range(1, 6)} | {"test_batch": 2}
    for name, n in batches.items():
        data = rng.integers(0, 256, (n, 3 * 32 * 32), dtype=np.uint8)
        with open(src / name, "wb") as f:
            pickle.dump({b"data": data, b"labels": list(range(n))}, f)
    prepare("cifar10", str(src), str(tmp_path / "set"))
    rows = take_rows(str(tmp_path / "set"), np.arange(17))
    first = pickle.load(open(src / "data_batch_1", "rb"))[b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(decode_image(rows.images[0], 3, (32, 32)), first)
    assert list(rows.labels) == [0, 1, 2] * 5 + [0, 1]
    (src / "test_batch").unlink()
    with pytest.raises(FileNotFoundError, match="test_batch"):
        prepare("cifar10", str(src), str(tmp_path / "x"))


def test_prepare_image_size_resizes_records_the_shape_and_leaves_out_bad_rows(tmp_path, capsys):
    """A folder of RGB JPEGs of several sizes (and a broken and a greyscale file): kept byte for byte without
    image_size=; with it, every good image is a PNG of that size, the files record it, bad rows are named."""
    root, rng = tmp_path / "photos", np.random.default_rng(0)
    (root / "bolt").mkdir(parents=True)
    originals = {}
    for k, (h, w) in enumerate([(96, 96), (120, 80), (64, 64)]):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="JPEG")
        (root / "bolt" / f"{k}.jpg").write_bytes(buf.getvalue())
        originals[f"bolt/{k}.jpg"] = buf.getvalue()
    (root / "bolt" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray(np.zeros((50, 50), np.uint8)).save(root / "bolt" / "4.png")  # greyscale in an RGB set

    prepare("folder", str(root), str(tmp_path / "asis"))
    kept = take_rows(str(tmp_path / "asis"), np.arange(5))
    assert {i: b for i, b in zip(kept.ids, kept.images) if i in originals} == originals  # no re-encoding

    prepare("folder", str(root), str(tmp_path / "set"), image_size=(48, 64))
    assert recorded_shape(str(tmp_path / "set")) == ImageShape((48, 64), 3)
    rows = take_rows(str(tmp_path / "set"), np.arange(3))
    assert rows.ids == ["bolt/0.jpg", "bolt/1.jpg", "bolt/2.jpg"]
    for blob, name in zip(rows.images, rows.ids):
        assert blob.startswith(b"\x89PNG")
        expected = decode_image(originals[name], 3, (48, 64))  # the decoding policy's resize (Lanczos)
        np.testing.assert_array_equal(decode_image(blob, 3, (48, 64)), expected)
    err = capsys.readouterr().err
    assert "2 image(s) could not be resized to 48x64" in err and "bolt/3.png" in err and "bolt/4.png" in err


def test_prepare_defects_generates_at_the_size_and_records_it(tmp_path):
    from gradcon_core.data.defects import DefectCounts

    out = tmp_path / "defects"
    prepare("defects", None, str(out), image_size=40, seed=3, counts=DefectCounts(2, 1, 1), classes=("wood",))
    assert recorded_shape(str(out)) == ImageShape((40, 40), 3)
    table = pq.read_table(out)
    assert table.num_rows == 4 and table.column("is_anomaly").to_pylist() == [False, False, False, True]
    assert decode_image(table.column("image")[0].as_py(), 3, (40, 40)).shape == (40, 40, 3)
    with pytest.raises(ValueError, match="needs source="):
        prepare("mnist", None, str(tmp_path / "x"))


def test_sets_the_jobs_would_fail_on_halfway_are_refused_naming_the_file(tmp_path):
    from gradcon_core.data.imageset import check_image_set

    def image_set(name, *tables):
        root = tmp_path / name
        root.mkdir()
        for k, table in enumerate(tables):
            pq.write_table(table, root / f"part-{k}.parquet")
        return str(root)

    png = encode_png(np.zeros((4, 4), np.uint8))
    good = pa.table({"id": ["a"], "image": [png], "label": [1], "is_anomaly": [False]})
    check_image_set(image_set("good", good, good))
    cases = {
        "ids": (pa.table({"id": [7], "image": [png]}), "column 'id' is int64 in .*part-1.parquet but string"),
        "label": (good.set_column(2, "label", pa.array(["cat"])), "'label' must hold integers, got string"),
        "flag": (good.set_column(3, "is_anomaly", pa.array(["yes"])), "'is_anomaly' must hold booleans"),
        "image": (good.set_column(1, "image", pa.array([3])), "'image' must be binary or struct"),
        "no_image": (good.drop_columns(["image"]), "has no 'image' column"),
    }
    for name, (second, message) in cases.items():
        with pytest.raises(ValueError, match=message):
            check_image_set(image_set(name, good, second))
    broken = image_set("broken", good)
    (tmp_path / "broken" / "part-1.parquet").write_bytes(b"")  # an empty file
    with pytest.raises(ValueError, match="part-1.parquet is not a readable parquet file"):
        check_image_set(broken)
