"""Submit a job (train, tune, score, eval, ...) to a Ray cluster's job API, follow its logs, exit with its status.

gradcon submit JOB [--address http://HEAD:8265] [--no-wait] [--env NAME ...] [--pip PKG==V ...] -- JOB ARGUMENTS
  e.g.  gradcon submit score --address http://127.0.0.1:8265 -- --model s3://b/runs/r/checkpoint --input ...

The entrypoint is `python -m jobs JOB ARGUMENTS` (quoted with shlex) run on the head with this repository as
its working_dir (uploaded without .venv, data, runs, results, .git and caches); the head's Python must have the
package's dependencies (ray_cluster.yaml installs them pinned). Exit code: 0 when the job SUCCEEDED, 1 when
it FAILED or was STOPPED (its error is printed), 2 when the cluster cannot be reached or refuses the token.
With --no-wait only the job id is printed (exit 0).

Token authentication: when RAY_AUTH_MODE is unset and a token is at hand (RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH
or ~/.ray/auth_token), it is sent, as `ray start` does; RAY_AUTH_MODE=disabled is respected. The token is
never printed. --env NAME forwards a variable from this environment by name (e.g. AWS_ENDPOINT_URL): its
value is stored in the job's runtime_env, which anyone with access to the dashboard can read, so on a cloud
cluster credentials should come from the instance role (or a Kubernetes secret), not be forwarded.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import shlex
import sys
import time
from collections.abc import Iterator
from pathlib import Path

JOBS = ("prepare", "train", "tune", "score", "eval", "demo")
REPO = Path(__file__).resolve().parents[1]
# gitignore-style, relative to the working_dir: the upload is the code only.
EXCLUDES = ["/.venv", "/data", "/runs", "/results", "/.git", "/.ci", "__pycache__", ".pytest_cache",
            ".ruff_cache", "*.egg-info", "*.pyc"]
SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|PRIVATE|(^|_)KEY($|_)", re.IGNORECASE)
AUTH_MODE = "RAY_AUTH_MODE"


class SubmissionError(ValueError):
    """The cluster cannot be reached, refuses the token, or the request is malformed (exit 2)."""


def entrypoint(job: str, job_args: list[str]) -> str:
    """The shell command the job API runs: every argument quoted, so nothing in them reaches the shell."""
    return shlex.join(["python", "-m", "jobs", job, *job_args])


def runtime_env(working_dir: str, env_names: list[str], pip: list[str]) -> dict:
    env_vars = {}
    for name in env_names:
        if name not in os.environ:
            raise SubmissionError(f"--env {name}: {name} is not set in this environment")
        env_vars[name] = os.environ[name]
        if SECRET_NAME.search(name):
            print(f"warning: forwarding {name}: its value is visible to anyone who can read this job's runtime_env "
                  "on the dashboard; on a cluster prefer the instance role", file=sys.stderr)
    unpinned = [p for p in pip if "==" not in p and "@" not in p]
    if unpinned:
        raise SubmissionError(f"--pip {' '.join(unpinned)}: pin a version (NAME==VERSION or NAME @ URL@COMMIT)")
    env: dict = {"working_dir": working_dir, "excludes": EXCLUDES}
    if env_vars:
        env["env_vars"] = env_vars
    if pip:
        env["pip"] = pip
    return env


def secret_values(env_names: list[str]) -> list[str]:
    """Values that must never be printed: the token and every secret-looking variable in this environment."""
    names = {n for n in os.environ if SECRET_NAME.search(n)} | set(env_names)
    return sorted({os.environ[n] for n in names if n in os.environ and len(os.environ[n]) >= 6}, key=len, reverse=True)


def redact(text: str, secrets: list[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text


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
    """JobSubmissionClient lets RAY_API_SERVER_ADDRESS / RAY_ADDRESS override its argument: make --address win."""
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
                              "--address http://127.0.0.1:8265") from None


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


def _options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=os.environ.get("RAY_ADDRESS") or "http://127.0.0.1:8265",
                        help="the head's job API, default $RAY_ADDRESS or http://127.0.0.1:8265 (a tunnel)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return")
    parser.add_argument("--working-dir", default=str(REPO), help="uploaded as the job's working_dir (this repo)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME",
                        help="forward this environment variable by name (not for credentials on a cloud cluster)")
    parser.add_argument("--pip", action="append", default=[], metavar="PKG==VERSION",
                        help="extra pinned pip requirement for the job's runtime_env")
    parser.add_argument("--submission-id", help="job id to use (default: one Ray makes)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    _options(parser)
    # One REMAINDER (not a `job` positional, which would swallow the `--` after it): JOB [OPTIONS] -- ARGS.
    parser.add_argument("target", nargs=argparse.REMAINDER, metavar="JOB [OPTIONS] -- ARGS",
                        help=f"JOB is one of {', '.join(JOBS)}; the job's own arguments go after --")


def _split(args: argparse.Namespace) -> tuple[argparse.Namespace, str, list[str]]:
    """(options, job, the job's arguments): options may come before or after JOB, and end at `--`."""
    if not args.target or args.target[0] not in JOBS:
        raise SubmissionError(f"name the job to submit, one of {', '.join(JOBS)}: gradcon submit JOB -- ARGS")
    job, rest = args.target[0], args.target[1:]
    own, job_args = (rest[:rest.index("--")], rest[rest.index("--") + 1:]) if "--" in rest else (rest, [])
    parser = argparse.ArgumentParser(prog=f"gradcon submit {job}")
    _options(parser)
    parser.set_defaults(**{k: v for k, v in vars(args).items() if k not in ("target", "command")})
    options, unknown = parser.parse_known_args(own)
    if unknown:
        raise SubmissionError(f"unknown submit options {' '.join(unknown)}: the job's own arguments go after --, "
                              f"e.g. gradcon submit {job} -- {' '.join(unknown)}")
    return options, job, job_args


def main(args: argparse.Namespace) -> int:
    args, job, job_args = _split(args)
    secrets = secret_values(args.env)
    env = runtime_env(args.working_dir, args.env, args.pip)
    client = connect(args.address)
    command = entrypoint(job, job_args)
    try:
        job_id = client.submit_job(entrypoint=command, runtime_env=env, submission_id=args.submission_id)
    except RuntimeError as e:
        raise SubmissionError(f"the cluster at {args.address} did not accept the job: {redact(str(e), secrets)}") \
            from None
    if args.no_wait:
        print(job_id)
        return 0
    print(f"job {job_id} submitted to {args.address}: {redact(command, secrets)}", file=sys.stderr)
    try:
        status = follow(client, job_id, secrets)
    except KeyboardInterrupt:
        ray = "RAY_AUTH_MODE=token ray" if os.environ.get(AUTH_MODE) == "token" else "ray"  # its CLI needs the hint
        print(f"\nstopped following; job {job_id} goes on. Follow it: {ray} job logs --follow {job_id} --address "
              f"{args.address}   stop it: {ray} job stop {job_id} --address {args.address}", file=sys.stderr)
        return 130
    if status == "SUCCEEDED":
        print(f"job {job_id} SUCCEEDED", file=sys.stderr)
        return 0
    message = client.get_job_info(job_id).message or ""
    print(f"job {job_id} {status}: {redact(message, secrets)}", file=sys.stderr)
    return 1

