"""`gradcon submit` against a real `ray start --head` (token authentication on), and secrets kept out of outputs.

The head runs in its own process group with its own temp dir and free ports, so the teardown stops exactly
it (never a machine-wide `ray stop`) and checks that nothing of it is left.
"""
import contextlib
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
import torch

from gradcon_core import GradConDetector, create_model
from jobs import submit
from jobs.cli import main as cli_main
from jobs.prepare import prepare
from jobs.submit import EXCLUDES, SubmissionError, entrypoint, runtime_env

REPO = Path(__file__).resolve().parents[1]


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
def head(seaweed_s3):
    """A Ray head as `ray start --head` makes it, token auth on, with S3 credentials in the environment of its
    processes (as a Kubernetes Secret or an instance profile gives them); yields (dashboard URL, token, env,
    temp dir)."""
    missing = [m for m in ("aiohttp_cors", "grpc", "opencensus") if importlib.util.find_spec(m) is None]
    if missing:  # without them the head's dashboard starts minimal, with no HTTP server and so no job API
        pytest.fail(f"the job API needs ray[default] (missing {missing}): reinstall with `make install`")
    tmp = tempfile.mkdtemp(prefix="rh", dir="/tmp")  # short: Ray's unix socket paths live under it
    token = secrets.token_hex(16)
    gcs, dash, *others = _free_ports(8)
    flags = ["dashboard-agent-listen-port", "dashboard-agent-grpc-port", "runtime-env-agent-port",
             "metrics-export-port", "node-manager-port", "object-manager-port"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_")) and k != "PYTHONPATH"}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token, PATH=f"{Path(sys.executable).parent}:{env['PATH']}")
    s3 = seaweed_s3.options
    cluster_env = {**env, "AWS_ENDPOINT_URL": s3.endpoint, "AWS_ACCESS_KEY_ID": s3.access_key,
                   "AWS_SECRET_ACCESS_KEY": s3.secret_key}
    cmd = [sys.executable, "-m", "ray.scripts.scripts", "start", "--head", f"--port={gcs}",
           "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", *(f"--{f}={p}" for f, p in zip(flags, others)),
           "--num-cpus=3", f"--temp-dir={tmp}", "--disable-usage-stats", f"--object-store-memory={200 * 2**20}"]
    proc = subprocess.Popen(cmd, env=cluster_env, cwd=tmp, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0, out
        yield f"http://127.0.0.1:{dash}", token, env, Path(tmp)
    finally:
        left = _stop(proc.pid)
        assert not left, f"processes of the test's Ray head are left: {left}"
        shutil.rmtree(tmp, ignore_errors=True)


def _submit(head, *args: str, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    url, token, env, _ = head
    env = {**env, "PYTHONPATH": str(REPO), **(extra_env or {})}
    env.pop("RAY_AUTH_MODE")  # the client finds the token (RAY_AUTH_TOKEN) and sends it by itself
    return subprocess.run([sys.executable, "-m", "jobs", "submit", *args[:1], "--address", url, *args[1:]],
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


def _objects(fs: pafs.FileSystem, prefix: str) -> dict[str, bytes]:
    infos = fs.get_file_info(pafs.FileSelector(prefix, recursive=True))
    out = {}
    for info in infos:
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as f:
                out[info.path] = f.read()
    return out


def _head_files(head) -> list[Path]:
    """Everything the head wrote: its logs (job drivers, runtime-env and dashboard agents, GCS, raylet), the
    jobs' working dirs and runtime resources."""
    return [p for p in head[3].rglob("*") if p.is_file() and not p.is_symlink()]


def _job_table(head) -> str:
    """What anyone with access to the job API reads: every job's entrypoint, runtime_env and metadata."""
    url, _, env, _ = head
    code = "import sys; from jobs.submit import connect; print([j.dict() for j in connect(sys.argv[1]).list_jobs()])"
    env = {**env, "PYTHONPATH": str(REPO)}
    env.pop("RAY_AUTH_MODE")  # the client finds the token (RAY_AUTH_TOKEN) and sends it by itself
    listed = subprocess.run([sys.executable, "-c", code, url], env=env, cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert listed.returncode == 0, listed.stderr
    return listed.stdout


def _bytes_unless_removed(path: Path) -> bytes:
    """A running head replaces some of its files while we walk them (e.g. Prometheus' service-discovery json is
    written to a temp name and renamed): one gone between listing and reading holds nothing to find."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return b""


def _leaks(head, secret: str) -> list[str]:
    return [str(p) for p in _head_files(head) if secret.encode() in _bytes_unless_removed(p)] + \
        (["the job API's list_jobs"] if secret in _job_table(head) else [])


def test_submitted_score_job_succeeds_and_keeps_secrets_out(head, score_inputs, seaweed_s3):
    """The job writes its results to a real S3 with the credentials the cluster's nodes have (never sent with
    the job); the secret (and the Ray token) appear in no file it wrote (local, S3), in nothing the head wrote
    (its whole temp dir: every log, the jobs' working dirs), not in the job API's list_jobs and not in anything
    `gradcon submit` printed."""
    s3 = seaweed_s3.options
    result = _submit(head, "score", "env=AWS_ENDPOINT_URL", "--",
                     f"checkpoint={score_inputs / 'ckpt'}", f"input={score_inputs / 'set'}",
                     "output=s3://gradcon-test/submitted", "batch_size=128",
                     extra_env={"AWS_ENDPOINT_URL": s3.endpoint})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCEEDED" in result.stderr and "rows 500  errors 0" in result.stdout  # the job's own logs, followed
    written = _objects(seaweed_s3.filesystem(), "gradcon-test/submitted")
    parts = [pq.read_table(pa.BufferReader(data)) for path, data in written.items() if path.endswith(".parquet")]
    assert len(parts) == 2 and sum(t.num_rows for t in parts) == 500
    assert all(t.column("score").null_count == 0 for t in parts) and "gradcon-test/submitted/_summary.json" in written
    drivers = list(head[3].glob("session_*/logs/job-driver-*.log"))  # the job's raw output, before submit redacts
    assert drivers and any(b"rows 500" in p.read_bytes() for p in drivers)
    local = [p.read_bytes() for p in score_inputs.rglob("*") if p.is_file()]
    for blob in [result.stdout.encode(), result.stderr.encode(), *written.values(), *local]:
        assert s3.secret_key.encode() not in blob and head[1].encode() not in blob
    assert _leaks(head, s3.secret_key) == [] and _leaks(head, head[1]) == []


def test_a_secret_is_not_sent_in_the_runtime_env(head, tmp_path):
    """env= with a secret-looking name is refused before anything reaches the cluster (Ray would keep its value
    in plaintext in its job table and the head's runtime-env agent log)."""
    secret = secrets.token_hex(16)
    result = _submit(head, "score", "env=AWS_SECRET_ACCESS_KEY", "--", f"checkpoint={tmp_path / 'none'}",
                     f"input={tmp_path}", f"output={tmp_path / 'o'}",
                     extra_env={"AWS_SECRET_ACCESS_KEY": secret})
    assert result.returncode == 2, result.stdout + result.stderr
    assert "AWS_SECRET_ACCESS_KEY" in result.stderr and "allow_secret_env=true" in result.stderr
    assert "instance profile" in result.stderr and secret not in result.stdout + result.stderr
    assert _leaks(head, secret) == []


def test_an_allowed_secret_warns_where_ray_keeps_it(head, tmp_path):
    """With allow_secret_env=true the variable is sent, and the warning names the places where it then is."""
    secret = secrets.token_hex(16)
    result = _submit(head, "score", "allow_secret_env=true", "env=GRADCON_TEST_TOKEN", "--",
                     f"checkpoint={tmp_path / 'none'}", f"input={tmp_path}", f"output={tmp_path / 'o'}",
                     extra_env={"GRADCON_TEST_TOKEN": secret})
    assert result.returncode == 1  # the job ran (and failed: no model)
    assert "warning: GRADCON_TEST_TOKEN" in result.stderr and secret not in result.stdout + result.stderr
    leaks = _leaks(head, secret)  # seen: [.../session_*/logs/runtime_env_agent.log, "the job API's list_jobs"]
    assert "the job API's list_jobs" in leaks and any(p.endswith("runtime_env_agent.log") for p in leaks)
    for place in ("list_jobs", "runtime_env_agent.log"):
        assert place in result.stderr


def test_a_failing_job_exits_non_zero_with_its_error(head, tmp_path):
    result = _submit(head, "score", "--", f"checkpoint={tmp_path / 'no-such-model'}", f"input={tmp_path}",
                     f"output={tmp_path / 'o'}")
    assert result.returncode == 1
    assert "FAILED" in result.stderr and "no-such-model does not exist" in result.stderr
    assert head[1] not in result.stdout + result.stderr


def test_a_wrong_token_is_a_clear_error(head):
    refused = _submit(head, "score", "wait=false", extra_env={"RAY_AUTH_TOKEN": "not-the-token-123"})
    assert refused.returncode == 2 and "refused" in refused.stderr and "RAY_AUTH_TOKEN" in refused.stderr
    assert "not-the-token-123" not in refused.stdout + refused.stderr


def test_no_cluster_is_a_clear_error(monkeypatch, capsys):
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # in this process: leave the session's Ray settings alone
    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    assert cli_main(["submit", "score", "wait=false", f"address={url}", "--", "checkpoint=/m"]) == 2
    assert "cannot reach the Ray job API" in capsys.readouterr().err


def test_a_token_path_naming_no_file_is_a_clear_error(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "no-token"))
    url = f"http://127.0.0.1:{_free_ports(1)[0]}"
    assert cli_main(["submit", "score", "wait=false", f"address={url}", "--", "checkpoint=/m"]) == 2
    assert f"RAY_AUTH_TOKEN_PATH={tmp_path / 'no-token'} is not a file" in capsys.readouterr().err
    from cluster.ray_init import init_ray

    with pytest.raises(ValueError, match="RAY_AUTH_TOKEN_PATH"):  # before any Ray starts
        init_ray()


def test_entrypoint_quotes_arguments_and_runtime_env_ships_code_only(monkeypatch, tmp_path):
    assert entrypoint("tune", ["--search", "alpha=loguniform(1e-3,1)", "x; rm -rf /"]) == \
        "python -m jobs tune --search 'alpha=loguniform(1e-3,1)' 'x; rm -rf /'"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    env = runtime_env(str(REPO), ["AWS_ENDPOINT_URL"], ["s3fs==2026.9.0"])
    assert env["env_vars"] == {"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"} and env["excludes"] == EXCLUDES
    from ray._private.runtime_env.packaging import create_package  # what the job client uploads

    create_package(str(REPO), tmp_path / "pkg.zip", include_gitignore=True, excludes=EXCLUDES)
    top = {name.split("/")[0] for name in zipfile.ZipFile(tmp_path / "pkg.zip").namelist()}
    assert {"jobs", "cluster", "gradcon_core"} <= top and not top & {".venv", "data", "runs", "results", ".git"}
    assert (tmp_path / "pkg.zip").stat().st_size < 2 * 2**20
    with pytest.raises(SubmissionError, match="pin a version"):
        runtime_env(str(REPO), [], ["s3fs"])
    with pytest.raises(SubmissionError, match="NOT_SET_ANYWHERE is not set"):
        runtime_env(str(REPO), ["NOT_SET_ANYWHERE"], [])


def test_ctrl_c_stops_following_and_says_how_to_resume(monkeypatch, capsys):
    class Client:
        def submit_job(self, **kwargs):
            return "raysubmit_x"

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(submit, "connect", lambda address: Client())
    monkeypatch.setattr(submit, "follow", interrupted)
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    assert cli_main(["submit", "train", "address=http://h:8265", "--", "epochs=1", "storage=s3://b/r"]) == 130
    err = capsys.readouterr().err
    assert "RAY_AUTH_MODE=token ray job logs --follow raysubmit_x --address http://h:8265" in err
    assert "ray job stop raysubmit_x" in err


def test_secret_names_are_refused_in_the_runtime_env_unless_allowed(monkeypatch):
    from cluster.redact import is_secret_name, redact, secret_values

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9000")
    assert [n for n in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "DB_PASSWORD",
                        "AWS_ENDPOINT_URL", "KEYBOARD") if is_secret_name(n)] == \
        ["AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "DB_PASSWORD"]
    with pytest.raises(SubmissionError, match="AWS_SECRET_ACCESS_KEY: refused.*instance profile.*allow_secret_env"):
        runtime_env(str(REPO), ["AWS_ENDPOINT_URL", "AWS_SECRET_ACCESS_KEY"], [])
    env = runtime_env(str(REPO), ["AWS_SECRET_ACCESS_KEY"], [], allow_secrets=True)
    assert env["env_vars"] == {"AWS_SECRET_ACCESS_KEY": "wJalrXUtnFEMI"}
    assert "wJalrXUtnFEMI" in secret_values() and redact("key wJalrXUtnFEMI", secret_values()) == "key ***"


class _Refusing:
    def __getattr__(self, name):
        raise AssertionError("the command reached the cluster")


@pytest.mark.parametrize(("job", "args", "culprit"), [
    ("score", ["checkpoint=runs/r/checkpoint", "input=s3://b/in", "output=s3://b/out"], "checkpoint=runs/r/checkpoint"),
    ("score", ["--model", "runs/r/checkpoint", "--input", "s3://b/in", "--output", "s3://b/out"],  # old flags
     "--model runs/r/checkpoint"),
    ("score", ["checkpoint=s3://b/m", "input=/data/in", "output=scores"], "output=scores"),
    ("train", ["data=data/sets/mnist", "storage=s3://b/runs"], "data=data/sets/mnist"),
    ("tune", ["data=/data/set", "storage=./sweeps", "search.alpha=uniform(0,1)"], "storage=./sweeps"),
    ("train", ["data=s3://b/sets/mnist"], "storage is not given"),  # its default, `runs`, is relative
    ("eval", ["data=s3://b/sets/mnist", "classes=0"], "out is not given"),
])
def test_relative_paths_are_refused_before_anything_is_submitted(monkeypatch, capsys, job, args, culprit):
    """On the cluster a relative path resolves inside the job's temporary copy of this repository: inputs are
    not there, and outputs written there are lost with it."""
    monkeypatch.setattr(submit, "connect", lambda address: _Refusing())
    assert cli_main(["submit", job, "address=http://h:8265", "--", *args]) == 2
    err = capsys.readouterr().err
    assert culprit in err and "absolute" in err, err


def test_absolute_paths_and_urls_are_submitted(monkeypatch, tmp_path):
    submitted = {}

    class Client:
        def submit_job(self, **kwargs):
            submitted.update(kwargs)
            return "raysubmit_x"

    monkeypatch.setattr(submit, "connect", lambda address: Client())
    config = tmp_path / "train.yaml"
    config.write_text("storage: s3://b/runs\n")
    args = ["--config", str(config), "data=/shared/sets/mnist", "normal_class=3"]
    assert cli_main(["submit", "train", "wait=false", "address=http://h:8265", "--", *args]) == 0
    assert submitted["entrypoint"] == f"python -m jobs train --config {config} data=/shared/sets/mnist normal_class=3"
