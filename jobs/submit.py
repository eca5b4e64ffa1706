"""Submit a job (train, tune, score, eval, ...) to a Ray cluster's job API, follow its logs, exit with its status.

gradcon submit JOB [address=http://HEAD:8265] [wait=false] [env=NAME,...] [allow_secret_env=true]
               [pip=PKG==V,...] -- JOB'S OWN SETTINGS
  e.g.  gradcon submit score address=http://127.0.0.1:8265 -- checkpoint=s3://b/runs/r/checkpoint input=...

The entrypoint is `python -m jobs JOB ARGUMENTS` (quoted with shlex) run on the head with this repository as
its working_dir (uploaded without .venv, data, runs, results, .git and caches); the head's Python must have the
package's dependencies (ray_cluster.yaml installs them pinned). Exit code: 0 when the job SUCCEEDED, 1 when
it FAILED or was STOPPED (its error is printed), 2 when the cluster cannot be reached or refuses the token.
With wait=false only the job id is printed (exit 0).

Token authentication: when RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token), it is sent, as `ray start` does; RAY_AUTH_MODE=disabled is respected. The token is
never printed. env=NAME forwards a variable from this environment by name (e.g. AWS_ENDPOINT_URL). Ray keeps
a runtime_env in plaintext (its job table, which anyone with access to the job API reads, and the head's
runtime-env agent log), so a secret-looking name (SECRET, TOKEN, PASSWORD, CREDENTIAL, PRIVATE, KEY) is refused
unless allow_secret_env=true: credentials belong to the cluster (instance profile, IRSA, a Kubernetes Secret).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from cluster.redact import is_secret_name, redact, secret_values
from gradcon_core.config import Config, local_path

JOBS = ("prepare", "train", "tune", "score", "eval", "demo")
REPO = Path(__file__).resolve().parents[1]
# gitignore-style, relative to the working_dir: the upload is the code only.
EXCLUDES = ["/.venv", "/data", "/runs", "/results", "/.git", "/.ci", "__pycache__", ".pytest_cache",
            ".ruff_cache", "*.egg-info", "*.pyc"]
AUTH_MODE = "RAY_AUTH_MODE"
# The jobs' settings that name local paths (key=value, or the --key VALUE of the release before: --model was the
# checkpoint), and the output settings whose defaults are relative (train/tune `runs`, eval `results`, demo
# `runs/demo`): on the cluster they would be written inside the job's temporary copy of this repository and lost.
PATH_SETTINGS = {"data", "storage", "out", "data_dir", "checkpoint", "input", "output", "source", "compare_with"}
OLD_FLAGS = {"model": "checkpoint"}
OUTPUT_SETTING = {"train": "storage", "tune": "storage", "eval": "out", "demo": "out"}


class SubmissionError(ValueError):
    """The cluster cannot be reached, refuses the token, or the request is malformed (exit 2)."""


def entrypoint(job: str, job_args: list[str]) -> str:
    """The shell command the job API runs: every argument quoted, so nothing in them reaches the shell."""
    return shlex.join(["python", "-m", "jobs", job, *job_args])


# Where Ray 2.60 keeps a job's runtime_env, env_vars included, in plaintext (tests/test_submit.py checks them).
RUNTIME_ENV_KEPT = ("the head's job table (the job API's list_jobs, `ray job list`, the dashboard's Jobs page: "
                    "anyone with access to the job API reads it) and the head's session_*/logs/runtime_env_agent.log")
CLUSTER_CREDENTIALS = ("give the cluster its own credentials instead: the nodes' IAM instance profile "
                       "(ray_cluster.yaml), an IRSA service account or a Kubernetes Secret in the pods' environment "
                       "(cluster/k8s/), or the environment of `ray start` on each node")


def _path_arguments(job_args: list[str]) -> Iterator[tuple[str, str, str]]:
    """(setting, value, as written) for every path setting among a job's arguments."""
    for k, arg in enumerate(job_args):
        if arg.startswith("--"):
            name, _, value = arg[2:].partition("=")
            name = OLD_FLAGS.get(name, name)
            if not value and k + 1 < len(job_args):
                value, arg = job_args[k + 1], f"{arg} {job_args[k + 1]}"
        else:
            name, _, value = arg.partition("=")
        if name.replace("-", "_") in PATH_SETTINGS and value:
            yield name.replace("-", "_"), value, arg


def _config_file_settings(job_args: list[str], working_dir: str) -> dict:
    """The settings of the job's --config FILE, read here (the job reads the uploaded copy); {} if unreadable."""
    if "--config" not in job_args or job_args.index("--config") + 1 >= len(job_args):
        return {}
    name = job_args[job_args.index("--config") + 1]
    for path in (Path(name), Path(working_dir) / name):
        with contextlib.suppress(OSError, yaml.YAMLError):
            settings = yaml.safe_load(path.read_text())
            return settings if isinstance(settings, dict) else {}
    return {}


def check_paths(job: str, job_args: list[str], working_dir: str) -> None:
    """Refuse relative local paths: on the cluster they resolve inside the job's temporary working_dir, where
    inputs are missing and outputs are lost when Ray deletes it."""
    given = {name: (value, arg) for name, value, arg in _path_arguments(job_args)}
    for name, value in _config_file_settings(job_args, working_dir).items():
        if name in PATH_SETTINGS and isinstance(value, str):
            given.setdefault(name, (value, f"{name}: {value} (in --config)"))
    hint = ("use an absolute path on storage every node shares (the same on the cluster as here) or an s3:// URL; "
            "on the cluster a relative path resolves inside the job's temporary copy of this repository")
    for value, arg in given.values():
        if "://" not in value and not os.path.isabs(value):
            raise SubmissionError(f"{arg}: a relative path: {hint}")
    output = OUTPUT_SETTING.get(job)
    if output and output not in given:
        raise SubmissionError(f"{job}: {output} is not given and its default is a relative path: set {output}=... "
                              f"(absolute path or s3:// URL): {hint}")


def runtime_env(working_dir: str, env_names: list[str], pip: list[str], allow_secrets: bool = False) -> dict:
    env_vars = {}
    for name in env_names:
        if name not in os.environ:
            raise SubmissionError(f"env={name}: {name} is not set in this environment")
        if is_secret_name(name) and not allow_secrets:
            raise SubmissionError(f"env={name}: refused: it looks like a secret, and Ray would keep its value in "
                                  f"plaintext in {RUNTIME_ENV_KEPT}; {CLUSTER_CREDENTIALS}. To send it anyway: "
                                  "allow_secret_env=true")
        if is_secret_name(name):
            print(f"warning: {name} goes to the cluster in the job's runtime_env: Ray keeps its value in plaintext "
                  f"in {RUNTIME_ENV_KEPT}", file=sys.stderr)
        env_vars[name] = os.environ[name]
    unpinned = [p for p in pip if "==" not in p and "@" not in p]
    if unpinned:
        raise SubmissionError(f"pip={','.join(unpinned)}: pin a version (NAME==VERSION or NAME @ URL@COMMIT)")
    env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if env_vars:
        env["env_vars"] = env_vars
    if pip:
        env["pip"] = pip
    return env


def _send_token_if_available() -> None:
    """As `ray start --head` does: RAY_AUTH_MODE unset and a token found -> token mode for this process.

    JobSubmissionClient adds `Authorization: Bearer <token>` only when this process's RayConfig says token
    mode (ray/_private/authentication/http_token_authentication.py); the `ray job` CLI does not switch it on.
    """
    if AUTH_MODE in os.environ:
        return
    from ray._raylet import AuthenticationTokenLoader, Config

    if AuthenticationTokenLoader.instance().has_token(ignore_auth_mode=True):
        os.environ[AUTH_MODE] = "token"
        Config.initialize("")  # refresh the cached config so this process sees token mode


@contextlib.contextmanager
def _api_address(address: str) -> Iterator[None]:
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument: make address= win."""
    saved = os.environ.get("RAY_API_SERVER_ADDRESS")
    os.environ["RAY_API_SERVER_ADDRESS"] = address
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("RAY_API_SERVER_ADDRESS")
        else:
            os.environ["RAY_API_SERVER_ADDRESS"] = saved


def connect(address: str):
    """A JobSubmissionClient for address; unreachable or refused -> SubmissionError with what to do."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    from cluster.ray_init import check_token_path

    check_token_path()
    _send_token_if_available()
    try:
        with _api_address(address):
            return JobSubmissionClient(address)
    except AuthenticationError as e:
        raise SubmissionError(f"the Ray cluster at {address} refused the request: {e.message.splitlines()[0]}. "
                              "Set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH) to the cluster's token "
                              "(`ray get-auth-token` on the head)") from None
    except OSError as e:
        raise SubmissionError(f"cannot reach the Ray job API at {address} ({type(e).__name__}); on a cloud cluster "
                              "open a tunnel first: `ray dashboard ray_cluster.yaml`, then use "
                              "address=http://127.0.0.1:8265") from None


async def _follow(client, job_id: str, secrets: list[str]) -> None:
    async for lines in client.tail_job_logs(job_id):
        print(redact(lines, secrets), end="", flush=True)


def follow(client, job_id: str, secrets: list[str]) -> str:
    """Print the job's logs as they come; return its final status."""
    with contextlib.suppress(RuntimeError):  # a dropped log stream: the job goes on, wait for its status
        asyncio.run(_follow(client, job_id, secrets))
    while not (status := client.get_job_status(job_id)).is_terminal():
        time.sleep(1)
    return str(status)


WORDS = ("job",)  # gradcon submit JOB key=value ... -- JOB'S OWN SETTINGS


@dataclass
class SubmitConfig(Config):
    job: str = ""  # the job to run on the cluster: prepare, train, tune, score, eval or demo
    address: str = field(default_factory=lambda: os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265")  # job API
    wait: bool = True  # false: print the job id and return
    working_dir: str = local_path(str(REPO))  # uploaded as the job's working_dir (this repository)
    env: list[str] = field(default_factory=list)  # forward these environment variables by name (not credentials)
    allow_secret_env: bool = False  # let env= send secret-looking variables (Ray keeps them in plaintext)
    pip: list[str] = field(default_factory=list)  # extra pinned pip requirements (PKG==VERSION) for the job
    submission_id: str | None = None  # the job's id (default: one Ray makes)
    job_args: list[str] = field(default_factory=list)  # the job's own settings: what follows `--`

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.job not in JOBS:
            raise SubmissionError(f"name the job to submit, one of {', '.join(JOBS)}: gradcon submit JOB -- "
                                  "ITS SETTINGS" + (f" (got {self.job!r})" if self.job else ""))


Config = SubmitConfig


def run(cfg: SubmitConfig) -> int:
    """Submit, follow, and return the exit code (0 SUCCEEDED, 1 FAILED or STOPPED, 130 stopped following)."""
    check_paths(cfg.job, cfg.job_args, cfg.working_dir)
    secrets = secret_values(cfg.env)
    env = runtime_env(cfg.working_dir, cfg.env, cfg.pip, cfg.allow_secret_env)
    client = connect(cfg.address)
    command = entrypoint(cfg.job, cfg.job_args)
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=env, submission_id=cfg.submission_id)
    except RuntimeError as e:
        raise SubmissionError(f"the cluster at {cfg.address} did not accept the job: {redact(str(e), secrets)}") \
            from None
    if not cfg.wait:
        print(job_id)
        return 0
    print(f"job {job_id} submitted to {cfg.address}: {redact(command, secrets)}", file=sys.stderr)
    try:
        status = follow(client, job_id, secrets)
    except KeyboardInterrupt:
        ray = "RAY_AUTH_MODE=token ray" if os.environ.get(AUTH_MODE) == "token" else "ray"  # its CLI needs the hint
        print(f"\nstopped following; job {job_id} goes on. Follow it: {ray} job logs --follow {job_id} --address "
              f"{cfg.address}   stop it: {ray} job stop {job_id} --address {cfg.address}", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    message = client.get_job_info(job_id).message or ""
    print(f"job {job_id} {status}: {redact(message, secrets)}", file=sys.stderr)
    return 1
