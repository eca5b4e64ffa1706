"""The README is the front door: short, its links lead somewhere, and every command in it runs as written.

The tour's commands run one after another in a fresh folder (holding only `data/mnist`, as `make data` leaves
it) on the session's Ray (RAY_ADDRESS: each command's own embedded Ray would cost tens of seconds more), then
its Python block. The commands of a block that starts `# on a Ray cluster` need a cluster: they are read as the
command line reads them (settings checked, no relative paths), not run.
"""
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import MNIST_DIR

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CLUSTER_BLOCK = "# on a Ray cluster"


def blocks(path: Path, language: str) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", path.read_text(), flags=re.S)


def commands(block: str) -> list[list[str]]:
    """The block's `gradcon` command lines, continuations joined, comments dropped, split as a shell does."""
    lines = block.replace("\\\n", " ").splitlines()
    return [shlex.split(line, comments=True) for line in lines if line.startswith("gradcon ")]


def test_the_readme_is_a_front_door_whose_links_lead_somewhere():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    links = re.findall(r"\]\(([^)#]+)\)", text)
    assert links and all((ROOT / link).exists() for link in links), links


@pytest.mark.parametrize("doc", [README, ROOT / "docs" / "cluster.md"], ids=lambda p: p.name)
def test_every_cluster_command_reads_as_written(doc):
    from jobs import submit
    from jobs.cli import COMMANDS, parse

    cluster = [argv for b in blocks(doc, "bash") if b.startswith(CLUSTER_BLOCK) for argv in commands(b)]
    assert len(cluster) >= 3
    for argv in cluster:
        cfg = parse(COMMANDS[argv[1]], argv[2:])
        if argv[1] == "submit":
            submit.check_paths(cfg.job, cfg.job_args, cfg.working_dir)
            parse(COMMANDS[cfg.job], cfg.job_args)


@pytest.mark.slow  # job processes
def test_the_tour_runs_as_written(ray_local, tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "mnist").symlink_to(MNIST_DIR)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "disabled"}
    tour = [b for b in blocks(README, "bash") if b.startswith("gradcon ")]
    assert len(tour) == 1
    for argv in commands(tour[0]):
        done = subprocess.run([sys.executable, "-m", "jobs", *argv[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(argv)}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    runs = tmp_path / "runs"
    assert (runs / "digit3" / "best_checkpoint").exists() and (runs / "digit3-report" / "index.html").exists()
    assert len(list((runs / "digit3-scores").glob("*.parquet"))) == len(list((tmp_path / "data/sets/mnist").glob(
        "*.parquet")))
    assert (tmp_path / "results" / "digit3" / "table.md").exists()
    (python,) = blocks(README, "python")
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)
        namespace: dict = {}
        exec(compile(python, str(README), "exec"), namespace)
    finally:
        os.chdir(cwd)
    assert namespace["scores"].shape == (1000,) and set(namespace["flags"]) <= {0, 1}
