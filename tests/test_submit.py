"""`gradcon submit` against a real `ray start --head` (token authentication on), and secrets kept out of outputs.

The head runs in its own process group with its own temp dir and free ports, so the teardown stops exactly
it (never a machine-wide `ray stop`) and checks that nothing of it is left.
"""
import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import torch

from gradcon_core import GradConDetector, create_model
from jobs.prepare import prepare
from jobs.submit import EXCLUDES, SubmissionError, entrypoint, runtime_env

REPO = Path(__file__).resolve().parents[1]
SECRET = "fake-secret-" + secrets.token_hex(8)  # what a job gets in AWS_SECRET_ACCESS_KEY: must show up nowhere


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _processes_of(pgid: int) -> list[psutil.Process]:
    """The head's daemons (its process group) and everything they started (Ray workers make their own groups)."""
    group = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(p.pid) == pgid:
                group.append(p)
    found = {p.pid: p for p in group}
    for p in group:
        with contextlib.suppress(psutil.Error):
            found.update({c.pid: c for c in p.children(recursive=True)})
    return list(found.values())


def _stop(pgid: int) -> list[psutil.Process]:
    procs = _processes_of(pgid)
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        for p in procs:
            with contextlib.suppress(psutil.Error):
                p.send_signal(sig)
        _, procs = psutil.wait_procs(procs, timeout=wait)
    return procs


@pytest.fixture(scope="module")
def head():
    """A Ray head as `ray start --head` makes it, token auth on; yields (dashboard URL, token, env for clients)."""
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths live under it
    token = secrets.token_hex(16)
    gcs, dash, *others = _free_ports(8)
    flags = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "node-manager-port", "object-manager-port"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *(f"--{f}={p}" for f, p in zip(flags, others)),
           "--num-cpus=3", f"--temp-dir={tmp}", "--disable-usage-stats", f"--object-store-memory={200 * 2**20}"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        yield f"http://127.0.0.1:{dash}", token, env
    finally:
        left = _stop(proc.pid)
        assert not left, f"processes of the test's Ray head are left: {left}"
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(head, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    url, token, env = head
    env = {**env, "PYTHONPATH": str(REPO), **(extra_env or {})}
    env.pop("RAY_AUTH_MODE")  # the client finds the token (RAY_AUTH_TOKEN) and sends it by itself
    return subprocess.run([sys.executable, "-m", "jobs.cli", "submit", *args[:1], "--address", url, *args[1:]],
                          env=env, cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def score_inputs(tmp_path_factory, mnist_train, small_mnist_idx):
    root = tmp_path_factory.mktemp("submit")
    torch.manual_seed(0)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    det.fit(mnist_train[0][:256], epochs=1, batch_size=64)
    det.save(root / "ckpt")
    prepare("mnist", str(small_mnist_idx), str(root / "set"), rows_per_file=250)  # 500 rows, 2 files
    return root


def test_submitted_score_job_succeeds_and_keeps_secrets_out(head, score_inputs):
    out = score_inputs / "scores"
    result = _submit(head, "score", "--env", "AWS_SECRET_ACCESS_KEY", "--", "--model", str(score_inputs / "ckpt"),
                     "--input", str(score_inputs / "set"), "--output", str(out), "--batch-size", "128",
                     extra_env={"AWS_SECRET_ACCESS_KEY": SECRET})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stderr and "rows 500  errors 0" in result.stdout  # the job's own logs, followed
    table = pq.read_table(sorted(out.glob("*.parquet")))
    assert table.num_rows == 500 and table.column("score").null_count == 0
    written = [p for p in score_inputs.rglob("*") if p.is_file()]
    assert any(p.name == "_summary.json" for p in written)
    for text in [result.stdout, result.stderr, *(p.read_bytes().decode("latin-1") for p in written)]:
        assert SECRET not in text and head[1] not in text


def test_a_failing_job_exits_non_zero_with_its_error(head, tmp_path):
    result = _submit(head, "score", "--", "--model", str(tmp_path / "no-such-model"), "--input", str(tmp_path),
                     "--output", str(tmp_path / "o"))
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "no-such-model does not exist" in result.stderr
    assert head[1] not in result.stdout + result.stderr


def test_a_wrong_token_or_no_cluster_is_a_clear_error(head):
    refused = _submit(head, "score", "--no-wait", extra_env={"RAY_AUTH_TOKEN": "not-the-token-123"})
    assert refused.returncode == 2 and "refused" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
    assert "not-the-token-123" not in refused.stdout + refused.stderr
    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    gone = _submit(head, "score", "--no-wait", "--address", url)
    assert gone.returncode == 2 and "cannot reach" in gone.stderr


def test_entrypoint_quotes_arguments_and_runtime_env_ships_code_only(monkeypatch):
    assert entrypoint("tune", ["--search", "alpha=loguniform(1e-3,1)", "x; rm -rf /"]) == \
        "python -m jobs.tune --search 'alpha=loguniform(1e-3,1)' 'x; rm -rf /'"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = runtime_env(str(REPO), ["AWS_ENDPOINT_URL"], ["s3fs==2026.9.0"])
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"} and env["excludes"] == EXCLUDES
    assert {"/.venv", "/data", "/runs", "/results", "/.git"} <= set(EXCLUDES)
    with pytest.raises(SubmissionError, match="pin a version"):
        runtime_env(str(REPO), [], ["s3fs"])
    with pytest.raises(SubmissionError, match="NOT_SET_ANYWHERE is not set"):
        runtime_env(str(REPO), ["NOT_SET_ANYWHERE"], [])
