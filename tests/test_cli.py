import json

from jobs.cli import main
from tests.conftest import MNIST_DIR


def test_demo_runs_end_to_end_and_prints_auroc(tmp_path, capsys):
    out = tmp_path / "demo"
    code = main(["demo", f"data_dir={MNIST_DIR}", "train_images=300", "epochs=1", f"out={out}"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "AUROC" in printed and str(out / "checkpoint") in printed
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["auroc"] <= 1 and metrics["test_images"] == 2 * 980  # all test 0s + as many others
    assert (out / "config.yaml").read_text().count("train_images: 300") == 1


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", f"data_dir={tmp_path}", f"out={tmp_path / 'o'}"]) == 2
    assert "make data" in capsys.readouterr().err


def test_demo_rejects_unknown_config_keys(tmp_path, capsys):
    assert main(["demo", "epoch=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
