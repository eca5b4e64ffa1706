"""Storage plumbing: pyarrow filesystems for local paths and S3 (any endpoint), errors without secrets.

Endpoint and credentials come from flags or the standard variables (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION / AWS_DEFAULT_REGION); with neither, pyarrow
falls back to the instance role. They are never written into results or logs.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from urllib.parse import urlparse

import pyarrow.fs as pafs

from gradcon_core.files import resolve


class StorageError(RuntimeError):
    """Storage unreachable or refused; the message names the URL and never the secret."""


@dataclass(frozen=True)
class S3Options:
    endpoint: str | None = None  # e.g. http://127.0.0.1:8333; None = AWS
    access_key: str | None = None
    secret_key: str | None = field(default=None, repr=False)
    region: str | None = None

    @classmethod
    def from_env(cls, endpoint: str | None = None, access_key: str | None = None,
                 secret_key: str | None = None, region: str | None = None) -> S3Options:
        """Flags win over the AWS_* variables."""
        env = os.environ.get
        return cls(endpoint or env("AWS_ENDPOINT_URL_S3") or env("AWS_ENDPOINT_URL"),
                   access_key or env("AWS_ACCESS_KEY_ID"), secret_key or env("AWS_SECRET_ACCESS_KEY"),
                   region or env("AWS_REGION") or env("AWS_DEFAULT_REGION"))

    def redact(self, text: str) -> str:
        return text.replace(self.secret_key, "***") if self.secret_key else text


class _S3FileSystem(pafs.S3FileSystem):
    """pyarrow's S3 filesystem, pickled without its credentials.

    Ray pickles storage filesystems into what it writes (Tune: tuner.pkl and every trial's state, in the
    sweep's storage), and pyarrow's own pickle carries the secret key. Unpickled (in a trial, a Train worker,
    a resumed sweep), this one takes its credentials from that process's environment (the AWS_* variables,
    else the instance role), as every job on a cluster node does.
    """

    def __init__(self, options: S3Options, allow_bucket_creation: bool = False):
        kwargs: dict = {"region": options.region or "us-east-1", "allow_bucket_creation": allow_bucket_creation}
        if options.access_key:
            kwargs.update(access_key=options.access_key, secret_key=options.secret_key)
        if options.endpoint:
            url = urlparse(options.endpoint if "://" in options.endpoint else f"http://{options.endpoint}")
            kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
        super().__init__(**kwargs)
        self._public = (options.endpoint, options.region, allow_bucket_creation)

    def __reduce__(self):
        return _s3_from_environment, self._public


def _s3_from_environment(endpoint: str | None, region: str | None, allow_bucket_creation: bool) -> _S3FileSystem:
    return _S3FileSystem(S3Options.from_env(endpoint=endpoint, region=region), allow_bucket_creation)


def s3_filesystem(options: S3Options, allow_bucket_creation: bool = False,
                  credentials_in_pickles: bool = True) -> pafs.S3FileSystem:
    """credentials_in_pickles=False for a filesystem that Ray may pickle into storage (Tune's); the processes
    that unpickle it then need the credentials in their environment."""
    if not credentials_in_pickles:
        return _S3FileSystem(options, allow_bucket_creation)
    kwargs: dict = {"access_key": options.access_key, "secret_key": options.secret_key,
                    "region": options.region or "us-east-1", "allow_bucket_creation": allow_bucket_creation}
    if options.endpoint:
        url = urlparse(options.endpoint if "://" in options.endpoint else f"http://{options.endpoint}")
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme)
    if not options.access_key:
        kwargs.pop("access_key"), kwargs.pop("secret_key")
    return pafs.S3FileSystem(**kwargs)


def filesystem_for(uri: str, options: S3Options | None = None,
                   credentials_in_pickles: bool = True) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path in it) for a local path, file:// or s3:// URL."""
    if str(uri).startswith("s3://"):
        fs = s3_filesystem(options or S3Options.from_env(), credentials_in_pickles=credentials_in_pickles)
        return fs, str(uri)[len("s3://"):].rstrip("/")
    return resolve(uri)


def storage_failure(error: BaseException, options: S3Options | None = None) -> str | None:
    """The line of a failure's message that says the S3 storage failed, secrets redacted; None when it says no
    such thing. The messages searched: the error's, its causes' and, for a Ray Train failure, each worker's own
    error (the job's message holds snippets of their tracebacks, which Ray cuts: a long one loses the line)."""
    seen, pending = set(), [error]
    while pending:
        e = pending.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        for line in str(e).splitlines():
            if "AWS Error" in line:
                return (options or S3Options.from_env()).redact(line.strip())
        pending += [e.__cause__, e.__context__, *getattr(e, "worker_failures", {}).values()]
    return None


def check_reachable(uri: str, options: S3Options | None = None) -> pafs.FileInfo:
    """What is at uri (possibly nothing yet, for an output), or a clear StorageError when the storage cannot be
    asked (missing bucket, bad credentials, unreachable endpoint); secrets never appear in the message."""
    fs, path = filesystem_for(uri, options)
    try:
        return fs.get_file_info(path)
    except OSError as e:
        message = (options or S3Options.from_env()).redact(str(e))
        hint = ""
        denied = ("AccessDenied", "ACCESS_DENIED", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden")
        if any(w in message for w in denied):
            hint = " (check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the instance role)"
        raise StorageError(f"cannot read {uri}: {message}{hint}") from None


def check_readable(uri: str, options: S3Options | None = None) -> None:
    """Fail early, with a clear message, when uri cannot be listed (missing bucket, bad credentials) or is absent."""
    if check_reachable(uri, options).type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{uri} does not exist")
