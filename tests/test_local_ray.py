"""The embedded Ray: loopback only, sized for the README's commands, nothing left running, two jobs at once.

A "2-core machine" is simulated on any machine by making Ray detect 2 CPUs (the driver resolves its
resources with ray._private.utils.get_num_cpus); on the 2-core machine these tests were written on it is real.
"""
import contextlib
import ipaddress
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import psutil
import pyarrow as pa
import pytest

from tests.conftest import MNIST_DIR

REPO = Path(__file__).resolve().parents[1]
TWO_CORES = ("import sys, ray._private.utils as u; u.get_num_cpus = lambda *a, **k: 2; "
             "from jobs.cli import main; raise SystemExit(main(sys.argv[1:]))")
IDLE_DRIVER = """
import time
import ray
from cluster.ray_init import init_ray
init_ray(num_cpus=2)

@ray.remote
class Idle:
    def ping(self):
        return 1

actor = Idle.remote()
ray.get(actor.ping.remote())
print("ready", flush=True)
time.sleep(600)
"""

OTHER_CHILD_DRIVER = """
import subprocess, sys, time
from cluster.ray_init import init_ray, stop_ray
other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
init_ray(num_cpus=1)
time.sleep(3)  # long enough for the reaper to have seen `other`
stop_ray()
time.sleep(2)
print("other alive" if other.poll() is None else "other stopped", flush=True)
other.kill()
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_"))}
    return {**env, "RAY_AUTH_MODE": "disabled", "RAY_DATA_DISABLE_PROGRESS_BARS": "1", "PYTHONPATH": str(REPO)}


class Watched:
    """A command run in a subprocess; every process it starts is noted (every 0.2 s) while it runs."""

    def __init__(self, args: list[str], marker: str = "", **kwargs):
        env = {**_env(), "GRADCON_TEST_MARKER": marker} if marker else _env()
        self.proc = subprocess.Popen(args, cwd=REPO, env=env, start_new_session=True, **kwargs)
        self.seen: dict[int, psutil.Process] = {}
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        root = psutil.Process(self.proc.pid)
        while self.proc.poll() is None:
            with contextlib.suppress(psutil.Error):
                self.seen.update({p.pid: p for p in root.children(recursive=True)})
            time.sleep(0.2)

    def left_running(self) -> list[str]:
        return [f"{p.pid} {p.name()}" for p in self.seen.values() if _alive(p)]

    def kill_all(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        for p in self.seen.values():
            with contextlib.suppress(psutil.Error):
                p.kill()


def _alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%")[0])
    return address.is_loopback or bool(getattr(address, "ipv4_mapped", None) and address.ipv4_mapped.is_loopback)


def listening_sockets(processes) -> list[tuple[str, str, int]]:
    """(process, address, port) of every listening TCP socket and bound UDP socket of these processes."""
    found = []
    for p in processes:
        with contextlib.suppress(psutil.Error):
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN or (c.type == 2 and not c.raddr):  # 2: SOCK_DGRAM
                    found.append((f"{p.pid} {p.name()}", c.laddr.ip, c.laddr.port))
    return sorted(found)


@pytest.fixture(scope="module")
def zeros_set(tmp_path_factory, mnist_train):
    from gradcon_core.data.images import encode_png
    from gradcon_core.data.imageset import write_image_set

    x, y = mnist_train
    rows = np.concatenate([np.flatnonzero(y == 0)[:64], np.flatnonzero(y != 0)[:16]])
    table = pa.table({"id": [f"r{i:03d}" for i in range(len(rows))],
                      "image": pa.array([encode_png(img) for img in x[rows]], pa.binary()),
                      "label": pa.array(y[rows], pa.int64()), "split": ["train"] * len(rows)})
    path = tmp_path_factory.mktemp("zeros") / "set"
    write_image_set(str(path), table, rows_per_file=40)
    return str(path)


@pytest.mark.slow
def test_embedded_ray_listens_on_loopback_only(ray_local):
    """Every socket the embedded Ray's processes listen on (GCS, raylet, workers, agents, dashboard, metrics)."""
    import ray

    @ray.remote
    class Actor:
        def ping(self):
            return 1

    actor = Actor.remote()
    assert ray.get(actor.ping.remote()) == 1
    ray.data.range(8).map_batches(lambda b: b).take_all()  # Ray Data's own actors and tasks too
    me = psutil.Process()
    sockets = listening_sockets([me, *me.children(recursive=True)])
    ray.kill(actor)
    print("\n".join(f"{who}: {ip}:{port}" for who, ip, port in sockets))
    assert len({who for who, _, _ in sockets}) >= 5  # GCS, raylet, agents, dashboard, workers: the list is real
    assert [s for s in sockets if not _is_loopback(s[1])] == []


@pytest.mark.slow
def test_another_process_joins_the_embedded_ray_by_its_address(ray_local):
    """address=127.0.0.1:PORT (what the sweep test's driver and Ray's own processes use) still reaches the
    loopback-only GCS: Ray would otherwise swap 127.0.0.1 for the machine's network address."""
    address = ray_local.get_runtime_context().gcs_address
    assert address.startswith("127.0.0.1:")
    code = ("import sys, ray; from cluster.ray_init import init_ray; init_ray(sys.argv[1]); "
            "print(ray.cluster_resources()['CPU'])")
    joined = subprocess.run([sys.executable, "-c", code, address], cwd=REPO, env=_env(), capture_output=True,
                            text=True, timeout=120)
    assert joined.returncode == 0, joined.stderr[-2000:]
    assert float(joined.stdout.split()[-1]) == ray_local.cluster_resources()["CPU"]


@pytest.mark.slow
def test_a_killed_driver_leaves_no_ray_process_behind():
    """SIGKILL the process that started an embedded Ray: within seconds nothing it started is left."""
    driver = Watched([sys.executable, "-c", IDLE_DRIVER], stdout=subprocess.PIPE, text=True)
    try:
        assert driver.proc.stdout.readline().strip() == "ready"
        time.sleep(1)  # the watcher has seen the agents and the actor
        assert any("DashboardAgent" in name for name in driver.left_running())
        driver.proc.send_signal(signal.SIGKILL)
        driver.proc.wait()
        deadline = time.time() + 20
        while driver.left_running() and time.time() < deadline:
            time.sleep(0.5)
        assert driver.left_running() == []
    finally:
        driver.kill_all()


@pytest.mark.slow
def test_stopping_ray_leaves_the_commands_other_children_alone():
    """stop_ray stops Ray's processes only: the command's other children (a local S3 server) are its own."""
    done = subprocess.run([sys.executable, "-c", OTHER_CHILD_DRIVER], cwd=REPO, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split()[-2:] == ["other", "alive"]


def _processes_with(marker: str) -> list[str]:
    """Processes whose environment carries this marker: whatever a command started, even outside its tree."""
    found = []
    for p in psutil.process_iter(["pid", "name"]):
        with contextlib.suppress(psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            if p.environ().get("GRADCON_TEST_MARKER") == marker:
                found.append(f"{p.pid} {p.name()}")
    return found


@pytest.mark.slow
def test_the_quick_demo_and_a_tune_run_side_by_side_on_a_two_core_machine(zeros_set, tmp_path):
    """The README's first command, reduced (`gradcon demo quick=true`: local S3, embedded Ray, 2 Ray Train workers,
    scoring, report), and a 1-worker `gradcon tune`, at once, each with its own embedded Ray sized for a 2-core
    machine: both succeed, the demo prints an AUROC above chance and readable logs, and each has stopped
    everything it started by the time it returns. (One test for these claims: every embedded Ray and Ray
    Train start costs tens of seconds on two cores.)"""
    demo_out = tmp_path / "demo"
    commands = {"demo": ["demo", "quick=true", f"data_dir={MNIST_DIR}", f"out={demo_out}"],
                "tune": ["tune", "normal_class=0", "epochs=1", "batch_size=16", f"data={zeros_set}", "num_workers=1",
                         "num_samples=1", f"storage={tmp_path}", "name=readme-tune", "search.lr=choice(0.001)"]}
    markers = {job: uuid.uuid4().hex for job in commands}  # inherited by every process the command starts
    logs = {job: open(tmp_path / f"{job}.log", "w") for job in commands}  # closed below
    jobs = {job: Watched([sys.executable, "-c", TWO_CORES, *args], stdout=logs[job], stderr=subprocess.STDOUT,
                         marker=markers[job]) for job, args in commands.items()}
    left, deadline = {}, time.time() + 900
    try:
        while len(left) < len(jobs) and time.time() < deadline:
            for name, job in jobs.items():
                if name not in left and job.proc.poll() is not None:
                    left[name] = job.left_running() + _processes_with(markers[name])  # at once: it has just returned
            time.sleep(0.1)
        output = {job: (tmp_path / f"{job}.log").read_text() for job in commands}
        for name, job in jobs.items():
            assert job.proc.returncode == 0, output[name][-3000:]
        assert left == {"demo": [], "tune": []}
        assert (tmp_path / "readme-tune" / "summary.json").exists()

        demo = output["demo"]
        auroc = float(re.search(r"^AUROC (\S+)", demo, re.M).group(1))
        assert 0.5 < auroc <= 1, demo[-3000:]
        assert "s3://gradcon-demo/scores/" in demo and "[7/7]" in demo
        # Readable: one line per epoch, no report dumps, no warnings of our own code.
        assert len(re.findall(r"epoch 1/3 ", demo)) == 1 and "epoch 3/3 " in demo, demo[-3000:]
        assert "Reporting training result" not in demo and "FutureWarning" not in demo
        assert "DeprecationWarning" not in demo, demo[-3000:]  # Ray Train's own one is filtered (cluster/ray_init.py)
        assert (demo_out / "roc.png").stat().st_size > 0 and list((demo_out / "results").glob("*.parquet"))
        assert (demo_out / "checkpoint" / "model.safetensors").exists()
        assert f"report:       {demo_out / 'report' / 'index.html'}" in demo  # the demo ends with its report
        html = (demo_out / "report" / "index.html").read_text()
        assert "<img" in html and all((demo_out / "report" / src).is_file()
                                      for src in re.findall(r'<img src="([^"]+)"', html))
    finally:
        for job, log in zip(jobs.values(), logs.values()):
            job.kill_all()
            log.close()
