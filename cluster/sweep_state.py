"""Signed Tune sweep state: `gradcon tune resume=NAME` unpickles only files this user's sweep wrote.

Tune's restore unpickles tuner.pkl, the newest experiment_state-*.json (trial states embed pickles), the
searcher state (basic-variant-state-*, searcher-state-*) and each trial's params.pkl / error.pkl, all from
the sweep's storage: whoever can write there could otherwise run code wherever the sweep is resumed.

Every such file gets an HMAC-SHA256 over its path and content, with a key that never goes to storage:
GRADCON_STATE_KEY if set, else a per-user key file ($XDG_CONFIG_HOME or ~/.config)/gradcon/state.key
(32 random bytes, created 0600 on first use). The MACs live in gradcon-signature.json next to the state.
The sweep's driver signs: tuner.pkl once the Tuner has written it, the rest from a Tune callback each time
Tune saves its state (written beside that state, so that Tune's own upload carries both together). Before
a resume, every file in the sweep folder must carry a valid MAC, except files that are only parsed, never
unpickled (result.json, progress.csv, params.json, error.txt, TensorBoard events, our own YAML/JSON/parquet
outputs, and trials/, where Ray Train keeps JSON and our checkpoints load without pickle).
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import stat
from pathlib import Path, PurePosixPath

import pyarrow.fs as pafs
from ray.tune import Callback

from gradcon_core.files import read_bytes, write_bytes

KEY_VARIABLE = "GRADCON_STATE_KEY"
SIGNATURE = "gradcon-signature.json"
# Written and read by us (safe YAML/JSON/parquet), or by Ray and only parsed: nothing here is unpickled.
OURS = {SIGNATURE, "tune_config.yaml", "best_config.yaml", "summary.json", "trials.parquet", "trials.csv"}
PARSED = {"result.json", "progress.csv", "params.json", "error.txt", ".validate_storage_marker"}
TRAIN_RUNS = "trials"  # the trials' Ray Train runs (jobs/tune.py puts them under the sweep)


class UntrustedState(ValueError):
    """A sweep whose state this user's key did not sign: resuming it could run someone else's code."""


def key_file() -> Path:
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "gradcon" / "state.key"


def state_key() -> bytes:
    """This user's signing key: GRADCON_STATE_KEY, else the key file (created on first use, owner-only)."""
    if os.environ.get(KEY_VARIABLE):
        if len(os.environ[KEY_VARIABLE]) < 32:
            raise ValueError(f"{KEY_VARIABLE} is too short to be a key: use 32 random bytes, e.g. "
                             "`python -c 'import secrets; print(secrets.token_hex(32))'`")
        return os.environ[KEY_VARIABLE].encode()
    path = key_file()
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    if path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} (the key that signs sweep state) can be read by other users: chmod 600 {path}")
    return path.read_text().strip().encode()


def needs_signature(relpath: str) -> bool:
    """Whether Tune could unpickle this file of the sweep folder (anything not known to be only parsed)."""
    parts = PurePosixPath(relpath).parts
    if (len(parts) == 1 and parts[0] in OURS) or parts[0] == TRAIN_RUNS:
        return False
    return not (parts[-1] in PARSED or parts[-1].startswith("events.out.tfevents."))


def file_mac(key: bytes, relpath: str, data: bytes) -> str:
    return hmac.new(key, relpath.encode() + b"\0" + hashlib.sha256(data).digest(), hashlib.sha256).hexdigest()


def _files(fs: pafs.FileSystem, root: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root.rstrip("/")) + 1:] for i in infos if i.type == pafs.FileType.File)


def read_signature(fs: pafs.FileSystem, root: str) -> dict[str, str]:
    """The sweep's MACs by relative path ({} without a signature); each one proves itself against the key."""
    try:
        macs = json.loads(read_bytes(fs, f"{root}/{SIGNATURE}"))["macs"]
    except (FileNotFoundError, OSError, ValueError, KeyError, TypeError):
        return {}
    return {str(k): str(v) for k, v in macs.items()} if isinstance(macs, dict) else {}


def sign(fs: pafs.FileSystem, root: str, relpaths: list[str] | None = None) -> None:
    """Add MACs for these files (default: every file that needs one) to the sweep's signature."""
    key = state_key()
    macs = read_signature(fs, root)
    for relpath in _files(fs, root) if relpaths is None else relpaths:
        if needs_signature(relpath):
            macs[relpath] = file_mac(key, relpath, read_bytes(fs, f"{root}/{relpath}"))
    write_bytes(fs, f"{root}/{SIGNATURE}", json.dumps({"macs": macs}, indent=1, sort_keys=True).encode())


def verify(fs: pafs.FileSystem, root: str, what: str) -> None:
    """Raise UntrustedState naming every file Tune could unpickle that this user's key did not sign as it is."""
    key, macs = state_key(), read_signature(fs, root)
    bad = [p for p in _files(fs, root) if needs_signature(p)
           and not hmac.compare_digest(macs.get(p, ""), file_mac(key, p, read_bytes(fs, f"{root}/{p}")))]
    if bad:
        shown = ", ".join(bad[:5]) + (f" and {len(bad) - 5} more" if len(bad) > 5 else "")
        these = "this file" if len(bad) == 1 else "these files"
        raise UntrustedState(
            f"{what}: not resumed: Tune would unpickle {shown}, which runs any code in them, and your key "
            f"({key_source()}) did not sign {these} as {'it is' if len(bad) == 1 else 'they are'} now. This happens "
            "when someone else wrote to the sweep's storage, when another user (or another key) started the sweep, "
            "when it was started before gradcon signed sweeps, or when it was killed while saving its state. If "
            "nobody else can write there, resume with trust_storage=true (its state is then signed with your key); "
            "otherwise start a new sweep.")


def key_source() -> str:
    return KEY_VARIABLE if os.environ.get(KEY_VARIABLE) else str(key_file())


class SignState(Callback):
    """Signs the state Tune has just saved, from inside its save (Tune asks callbacks for their state right
    after writing the experiment and searcher states to its local staging folder, then uploads that folder):
    the signature lands in the staging folder and travels with the files it covers. Runs in the driver only.

    Holds nothing when pickled (Tune keeps it in tuner.pkl): no storage, no filesystem, no key.
    """

    def __init__(self):
        self._storage = None  # Tune's StorageContext, learnt from the first trial
        self._carried: dict[str, str] | None = None  # MACs already in storage (tuner.pkl, earlier sessions)

    def __getstate__(self) -> dict:
        return {}

    def __setstate__(self, state: dict) -> None:
        self.__init__()

    def on_step_begin(self, iteration: int, trials: list, **info) -> None:
        if self._storage is None and trials:
            self._storage = trials[0].storage

    def get_state(self) -> None:
        if self._storage is None:
            return None
        if self._carried is None:
            self._carried = read_signature(self._storage.storage_filesystem, self._storage.experiment_fs_path)
        staging, key = Path(self._storage.experiment_driver_staging_path), state_key()
        macs = dict(self._carried)
        for path in sorted(p for p in staging.rglob("*") if p.is_file()):
            relpath = path.relative_to(staging).as_posix()
            if needs_signature(relpath):
                macs[relpath] = file_mac(key, relpath, path.read_bytes())
        (staging / SIGNATURE).write_text(json.dumps({"macs": macs}, indent=1, sort_keys=True))
        return None  # nothing for Tune to save: a callback-states file would be one more pickle
