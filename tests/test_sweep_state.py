"""Signing a sweep's state (cluster/sweep_state.py) on its own: keys, MACs, what must be signed."""
import os
import pickle
import stat

import pyarrow.fs as pafs
import pytest

from cluster.sweep_state import (
    KEY_VARIABLE,
    SIGNATURE,
    SignState,
    UntrustedState,
    needs_signature,
    sign,
    state_key,
    verify,
)


@pytest.fixture
def sweep(tmp_path, monkeypatch):
    """A sweep folder as Tune and the tune job leave it."""
    monkeypatch.setenv(KEY_VARIABLE, "k" * 40)
    root = tmp_path / "sweep"
    files = {"tuner.pkl": b"tuner", "experiment_state-2026.json": b"{}", "basic-variant-state-2026.json": b"p",
             "run_trial_0/params.pkl": b"params", "run_trial_0/result.json": b"{}", "run_trial_0/progress.csv": b"",
             "run_trial_0/events.out.tfevents.1.vm": b"", "tune_config.yaml": b"lr: 1", "summary.json": b"{}",
             "trials/trial-0/checkpoint_manager_snapshot.json": b"{}"}
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_only_files_tune_may_unpickle_need_a_signature():
    assert [p for p in ["tuner.pkl", "experiment_state-x.json", "searcher-state-x.pkl", "run_trial_0/error.pkl",
                        "run_trial_0/result.json", "run_trial_0/params.json", "summary.json", "trials/t/x.json",
                        "run_trial_0/summary.json", "new-unknown-file"] if needs_signature(p)] == \
        ["tuner.pkl", "experiment_state-x.json", "searcher-state-x.pkl", "run_trial_0/error.pkl",
         "run_trial_0/summary.json", "new-unknown-file"]


def test_signed_state_verifies_and_any_change_is_named(sweep, monkeypatch):
    fs, root = pafs.LocalFileSystem(), str(sweep)
    with pytest.raises(UntrustedState, match="tuner.pkl"):
        verify(fs, root, "sweep s")  # never signed
    sign(fs, root)
    verify(fs, root, "sweep s")
    (sweep / "run_trial_0" / "result.json").write_text('{"x": 1}')  # parsed, never unpickled: no signature
    verify(fs, root, "sweep s")
    (sweep / "run_trial_0" / "params.pkl").write_bytes(b"other")
    (sweep / "searcher-state-9999.pkl").write_bytes(b"new")
    with pytest.raises(UntrustedState, match=r"run_trial_0/params.pkl, searcher-state-9999.pkl") as refused:
        verify(fs, root, "sweep s")
    assert "trust_storage=true" in str(refused.value) and "k" * 40 not in str(refused.value)
    sign(fs, root, ["run_trial_0/params.pkl", "searcher-state-9999.pkl"])
    verify(fs, root, "sweep s")
    monkeypatch.setenv(KEY_VARIABLE, "another user's key" * 3)
    with pytest.raises(UntrustedState, match="tuner.pkl"):
        verify(fs, root, "sweep s")
    assert "k" * 40 not in (sweep / SIGNATURE).read_text()


def test_the_key_file_is_made_once_for_its_owner_only(tmp_path, monkeypatch):
    monkeypatch.delenv(KEY_VARIABLE, raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    key = state_key()
    path = tmp_path / "gradcon" / "state.key"
    assert len(key) == 64 and state_key() == key and stat.S_IMODE(path.stat().st_mode) == 0o600
    os.chmod(path, 0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        state_key()
    monkeypatch.setenv(KEY_VARIABLE, "short")
    with pytest.raises(ValueError, match="too short"):
        state_key()


def test_the_callback_pickles_to_nothing():
    """Tune keeps the callback in tuner.pkl: it must not carry a storage filesystem (S3 credentials) or a key."""
    signer = SignState()
    signer._storage, signer._carried = "a StorageContext", {"tuner.pkl": "mac"}
    restored = pickle.loads(pickle.dumps(signer))
    assert restored._storage is None and restored._carried is None and b"StorageContext" not in pickle.dumps(signer)
