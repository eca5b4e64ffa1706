import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import psutil
import pytest

from jobs.cli import main
from tests.conftest import MNIST_DIR


def _processes_with(marker: str) -> list[str]:
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        try:
            if p.environ().get("GRADCON_TEST_MARKER") == marker:
                found.append(f"{p.pid} {p.info['name']}")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.mark.slow  # a gradcon demo subprocess
def test_quick_demo_runs_end_to_end_through_s3_and_leaves_nothing_running(tmp_path):
    """The README's first command, reduced: local S3 + embedded Ray, 2 workers; prints an AUROC above chance."""
    marker = uuid.uuid4().hex  # inherited by every process the demo starts (Ray's, SeaweedFS)
    out = tmp_path / "demo"
    env = {**os.environ, "GRADCON_TEST_MARKER": marker}
    for key in ("RAY_ADDRESS", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        env.pop(key, None)
    done = subprocess.run([sys.executable, "-m", "jobs", "demo", "--quick", f"data_dir={MNIST_DIR}", f"out={out}"],
                          cwd=Path(__file__).parents[1], env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    auroc = float(re.search(r"^AUROC (\S+)", done.stdout, re.M).group(1))
    assert 0.5 < auroc <= 1, done.stdout
    assert "s3://gradcon-demo/scores/" in done.stdout and "[7/7]" in done.stdout
    logs = done.stdout + done.stderr  # readable: one line per epoch, no report dumps, no warnings of our own code
    assert len(re.findall(r"epoch 1/3 ", logs)) == 1 and "epoch 3/3 " in logs, logs[-3000:]
    assert "Reporting training result" not in logs and "FutureWarning" not in logs
    assert (out / "roc.png").stat().st_size > 0 and list((out / "results").glob("*.parquet"))
    assert (out / "checkpoint" / "model.safetensors").exists()
    assert f"report:       {out / 'report' / 'index.html'}" in done.stdout  # the demo ends with its report
    html = (out / "report" / "index.html").read_text()
    assert "<img" in html and all((out / "report" / src).is_file() for src in re.findall(r'<img src="([^"]+)"', html))
    assert _processes_with(marker) == []


def test_demo_without_data_says_how_to_get_it(tmp_path, capsys):
    assert main(["demo", f"data_dir={tmp_path}", f"out={tmp_path / 'o'}"]) == 2
    assert "make data" in capsys.readouterr().err


def test_demo_rejects_unknown_config_keys(tmp_path, capsys):
    assert main(["demo", "epoch=3"]) == 2
    assert "unknown config key" in capsys.readouterr().err
