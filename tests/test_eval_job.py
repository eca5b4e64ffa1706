import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from gradcon_core.data.imageset import read_columns, write_image_set
from jobs.cli import main
from jobs.prepare import prepare


def test_eval_writes_tables_and_plots_and_reports_corrupt_rows(small_mnist_idx, tmp_path, capsys, monkeypatch,
                                                               ray_local):
    data = tmp_path / "set"
    prepare("mnist", str(small_mnist_idx), str(data))
    # Corrupt one training image of class 1 (by id) and check it is reported and skipped.
    (only_file,) = data.iterdir()
    table = pq.read_table(only_file)
    labels = table.column("label").to_numpy()
    victim = int(np.flatnonzero(labels == 1)[5])
    images = table.column("image").to_pylist()
    images[victim] = b"not an image"
    table = table.set_column(table.schema.get_field_index("image"), "image", pa.array(images, pa.binary()))
    write_image_set(str(data), table)
    victim_id = read_columns(str(data), ["label"]).column("id")[victim].as_py()

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    code = main(["eval", f"data={data}", "classes=0,1", "seeds=0,1", "epochs=1", f"out={tmp_path}", "name=run",
                 "tracking=mlflow"])
    assert code == 0
    out = tmp_path / "run"
    for name in ("table.md", "table.csv", "results.csv", "roc.png", "histograms.png", "auroc_by_class.png",
                 "config.yaml", "selections.json", "skipped_rows.csv"):
        assert (out / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert [(r["class"], r["seed"]) for r in rows] == [("0", "0"), ("0", "1"), ("1", "0"), ("1", "1")]
    assert all(0 <= float(r["auroc"]) <= 1 for r in rows)
    skipped = list(csv.DictReader(open(out / "skipped_rows.csv")))
    assert {r["id"] for r in skipped} == {victim_id} and skipped[0]["part"] in ("train", "val")
    md = (out / "table.md").read_text()
    assert md.startswith("# GradCon on mnist, gradcon protocol") and "| **mean** |" in md
    # Beside the GradCon paper's rows for these two classes, with our difference to its GradCon row.
    assert "| GradCon (Kwon et al. 2020) | 0.9950 | 0.9990 | 0.9970 |" in md
    ours = {int(r["class"]): np.mean([float(x["auroc"]) for x in rows if x["class"] == r["class"]]) for r in rows}
    assert f"| ours − GradCon | {ours[0] - 0.995:+.4f} | {ours[1] - 0.999:+.4f} |" in md
    assert "Only 2 of 10 classes were run" in md and "Paired Wilcoxon" in md
    printed = capsys.readouterr()
    assert victim_id in printed.err
    assert "eval: 1/4 runs (25%)" in printed.out and "eval: 4/4 runs (100%)" in printed.out  # progress
    assert "ETA" in printed.out

    client = MlflowClient(tracking_uri=store)
    (tracked,) = client.search_runs([client.get_experiment_by_name("gradcon").experiment_id],
                                    filter_string="attributes.run_name = 'run'")
    assert tracked.info.status == "FINISHED" and tracked.data.params["classes"] == "0,1"
    for r in rows:
        assert tracked.data.metrics[f"class_{r['class']}.seed_{r['seed']}.auroc"] == pytest.approx(float(r["auroc"]))
    assert tracked.data.metrics["mean_auroc"] == pytest.approx(np.mean([float(r["auroc"]) for r in rows]))
    assert {"table.md", "roc.png", "config.yaml"} <= {a.path for a in client.list_artifacts(tracked.info.run_id)}


def test_a_stopped_eval_resumes_without_rerunning_finished_runs(small_mnist_idx, tmp_path, capsys, ray_local):
    prepare("mnist", str(small_mnist_idx), str(tmp_path / "set"))
    args = ["eval", f"data={tmp_path / 'set'}", "classes=0,1", "seeds=0", "epochs=1", f"out={tmp_path}", "name=run"]
    assert main(args) == 0
    first = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    # As if the eval had been stopped before class 1 finished: its run was never saved.
    (tmp_path / "run" / "runs" / "class-1-seed-0.json").unlink()
    capsys.readouterr()
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "1 of 2 runs finished earlier" in printed and "class 1 seed 0:" in printed
    assert "class 0 seed 0:" not in printed
    again = list(csv.DictReader(open(tmp_path / "run" / "results.csv")))
    assert again[0] == first[0]  # class 0 taken as saved
    assert [r["class"] for r in again] == ["0", "1"]

    # More seeds under the same name add runs; other settings would mix two evals: refused.
    assert main([*args[:-1], "seeds=0,1", "name=run"]) == 0
    assert len(list(csv.DictReader(open(tmp_path / "run" / "results.csv")))) == 4
    assert main([*args, "epochs=2"]) == 2
    assert "holds an eval with other settings (epochs)" in capsys.readouterr().err

    # Another detector beside this one: its per-class AUROC in the table and a paired test.
    assert main(["eval", f"data={tmp_path / 'set'}", "detector=cae", "classes=0,1", "seeds=0", "epochs=1",
                 f"out={tmp_path}", "name=cae", f"compare_with={tmp_path / 'run'}"]) == 0
    md = (tmp_path / "cae" / "table.md").read_text()
    assert md.startswith("# CAE on mnist") and "| run |" in md and "ours (CAE) vs run" in md


def test_eval_rejects_unknown_classes(small_mnist_idx, tmp_path, capsys):
    prepare("mnist", str(small_mnist_idx), str(tmp_path / "set"))
    assert main(["eval", f"data={tmp_path / 'set'}", "classes=12", f"out={tmp_path}"]) == 2
    assert "not in" in capsys.readouterr().err
