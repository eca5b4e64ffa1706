"""Every registered detector under the one contract, on a tiny real MNIST task.

Normal: digit 1 (300 train, 100 validation images); test: 150 ones against 150 other digits.
Each case is fitted once (2 epochs unless EPOCHS says more, batch 32) and shared by the tests below.
"""
import copy
import threading

import numpy as np
import pytest
import torch
from sklearn.neighbors import KernelDensity
from sklearn.svm import OneClassSVM

from gradcon_core import evaluate, list_detectors, load_detector
from gradcon_core.data.images import encode_png
from gradcon_core.detectors.neural import NeuralDetector
from gradcon_core.detectors.registry import create_detector, detector_class
from gradcon_core.detectors.shallow import KDEDetector, OCSVMDetector
from gradcon_core.results.table import result_rows
from gradcon_core.training.parallel import LocalBatch

VARIANTS = [("vae", {"score": "kl"}), ("deep_svdd", {"objective": "soft-boundary"}), ("ocsvm", {"features": "cae"}),
            ("kde", {"features": "cae"})]
CASES = [(name, {}) for name in list_detectors()] + VARIANTS
# AUROC floors for this budget, set some way below what each case reached here (a constant score is 0.5).
FLOORS = {"ocsvm[features=cae]": 0.7}
EPOCHS = {"vae[score=kl]": 5}  # the KL score needs a used latent; reconstruction scores work after 2 epochs
DEFAULT_FLOOR = 0.85


def case_id(case) -> str:
    name, kwargs = case
    extra = ",".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}[{extra}]" if extra else name


def make(name: str, kwargs: dict):
    return create_detector(name, device="cpu", **kwargs)


@pytest.fixture(scope="module")
def task(mnist_train, mnist_test):
    x, y = mnist_train
    ones = np.flatnonzero(y == 1)
    xt, yt = mnist_test
    rng = np.random.default_rng(0)
    idx = np.concatenate([np.flatnonzero(yt == 1)[:150], rng.choice(np.flatnonzero(yt != 1), 150, replace=False)])
    return x[ones[:300]], x[ones[300:400]], xt[idx], yt[idx] != 1


@pytest.fixture(scope="module", params=CASES, ids=[case_id(c) for c in CASES])
def fitted(request, task):
    name, kwargs = request.param
    x, x_val, _, _ = task
    torch.manual_seed(0)
    det = make(name, kwargs)
    before = {k: v.detach().clone() for k, v in det.model.named_parameters()} if hasattr(det, "model") else None
    det.fit(x, epochs=EPOCHS.get(case_id(request.param), 2), batch_size=32, seed=0, x_val=x_val)
    return case_id(request.param), det, before


def test_scores_are_finite_varied_and_tell_ones_from_other_digits(fitted, task):
    cid, det, _ = fitted
    _, _, x_test, is_anomaly = task
    scores = det.decision_function(x_test)
    assert scores.dtype == np.float32 and scores.shape == (len(x_test),)
    assert np.isfinite(scores).all() and np.std(scores) > 1e-6
    np.testing.assert_array_equal(det.predict(x_test), (scores > det.threshold_).astype(np.int64))
    metrics = evaluate(scores, is_anomaly, det.threshold_)
    assert metrics["auroc"] > FLOORS.get(cid, DEFAULT_FLOOR), metrics


def test_save_load_round_trip_gives_identical_scores(fitted, task, tmp_path):
    _, det, _ = fitted
    x_test = task[2][:64]
    loaded = load_detector(det.save(tmp_path / "ckpt"))
    assert type(loaded) is type(det) and loaded.threshold_ == det.threshold_
    assert (loaded.channels, tuple(loaded.input_size)) == (det.channels, tuple(det.input_size))
    np.testing.assert_allclose(loaded.decision_function(x_test), det.decision_function(x_test), rtol=1e-6)


def test_fit_changes_every_weight(fitted):
    _, det, before = fitted
    if before is None:
        pytest.skip("no torch network (scikit-learn detector)")
    after = dict(det.model.named_parameters())
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_objective_decreases_from_the_first_to_the_last_epoch(fitted):
    _, det, _ = fitted
    if not hasattr(det, "history_"):
        pytest.skip("fitted by scikit-learn's solver, no epochs")
    losses = [h["loss"] for h in det.history_]
    assert len(losses) == det.fit_info_["epochs"] and losses[-1] < losses[0], losses


def test_bad_input_is_a_clear_value_error(fitted, task):
    _, det, _ = fitted
    x = task[2][:4]
    with pytest.raises(ValueError, match="3 channel"):
        det.decision_function(np.repeat(x[..., None], 3, axis=-1))
    with pytest.raises(ValueError, match="28x28 images, got 20x20"):
        det.decision_function(x[:, :20, :20])
    nan = x[:, None].astype(np.float32) / 255
    nan[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        det.decision_function(nan)


def test_result_table_rows_for_every_detector(fitted, task):
    _, det, _ = fitted
    images = [encode_png(img) for img in task[2][:3]] + [b"not an image"]
    table = result_rows(det, [0, 1, 2, 3], images, det.threshold_, "m").to_pydict()
    np.testing.assert_allclose(table["score"][:3], det.decision_function(task[2][:3]), rtol=1e-4, atol=1e-6)
    assert table["score"][3] is None and table["error"][3]
    assert (table["grad_score"][0] is None) == (det.name not in ("gradcon", "vae_grad"))


class RecordingSync:
    """A one-worker GradientSync (the mean over one worker is the identity) that records its calls."""

    def __init__(self, events: list):
        self.events = events

    def mean_(self, tensors: list[torch.Tensor]) -> None:
        self.events.append(("mean", list(tensors)))

    def mean_differentiable(self, t: torch.Tensor) -> torch.Tensor:
        return t


NEURAL = [c for c in CASES if issubclass(detector_class(c[0]), NeuralDetector)] + [("puzzle_ae", {"epsilon": 0.1})]


def record_steps(opt: torch.optim.Optimizer, i: int, events: list) -> None:
    """Make opt.step record, when called, whether the last sync call was with exactly its parameters' gradients."""
    step = opt.step
    params = [p for group in opt.param_groups for p in group["params"]]

    def recorded(*args, **kwargs):
        last = events[-1] if events else ("none", [])
        synced = last[0] == "mean" and len(last[1]) == len(params) and all(g is p.grad for g, p in zip(last[1], params))
        events.append(("step", i, synced))
        return step(*args, **kwargs)

    opt.step = recorded


@pytest.mark.parametrize("case", NEURAL, ids=[case_id(c) for c in NEURAL])
def test_a_step_all_reduces_every_gradient_before_every_optimizer_step(case, task):
    x = torch.from_numpy(task[0][:8, None]).float() / 255
    name, kwargs = case
    runs = []
    for sync in (None, "recording"):
        torch.manual_seed(0)
        det = make(name, kwargs)
        det.prepare(x)
        events: list = []
        for i, opt in enumerate(det.optimizers):
            record_steps(opt, i, events)
        torch.manual_seed(1)
        det.step(x, LocalBatch.alone(len(x)), torch.Generator(), RecordingSync(events) if sync else None)
        runs.append(det)
    steps = [e for e in events if e[0] == "step"]
    assert sorted(e[1] for e in steps) == list(range(len(runs[1].optimizers)))
    assert all(e[2] for e in steps), steps
    # One worker with a sync is one process without it.
    for a, b in zip(runs[0].state_tensors().values(), runs[1].state_tensors().values()):
        assert torch.equal(a, b)


def test_shallow_scores_are_scikit_learns():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(200, 5)), rng.normal(size=(50, 5)) * 1.5
    svm = OCSVMDetector(nu=0.2)
    svm.fit_features(train)
    expected = -OneClassSVM(nu=0.2, gamma=svm.gamma_).fit(train).decision_function(test)
    np.testing.assert_allclose(svm.score_features(test), expected, rtol=1e-6)
    kde = KDEDetector(bandwidth=0.7)
    kde.fit_features(train)
    np.testing.assert_allclose(kde.score_features(test), -KernelDensity(bandwidth=0.7).fit(train).score_samples(test),
                               rtol=1e-6)


class ThreadGroup:
    """n data-parallel workers as threads: member(r) is a GradientSync whose means are taken across them."""

    def __init__(self, n: int):
        self.n, self.barrier, self.flat = n, threading.Barrier(n), [None] * n

    def mean(self, rank: int, t: torch.Tensor) -> torch.Tensor:
        self.flat[rank] = t.detach().clone()
        self.barrier.wait()
        mean = torch.stack(self.flat).mean(0)
        self.barrier.wait()
        return mean

    def member(self, rank: int):
        group = self

        class Mean(torch.autograd.Function):
            """y = the mean over workers; each worker's input gets the mean of the workers' output gradients
            (the differentiable all-reduce GradCon's inner gradients need)."""

            @staticmethod
            def forward(ctx, t):
                return group.mean(rank, t)

            @staticmethod
            def backward(ctx, g):
                return group.mean(rank, g)

        class Member:
            world_size = group.n

            def mean_(self, tensors: list[torch.Tensor]) -> None:
                mean = group.mean(rank, torch.cat([t.flatten() for t in tensors]))
                for t, part in zip(tensors, mean.split([t.numel() for t in tensors])):
                    t.copy_(part.view_as(t))

            def mean_differentiable(self, t: torch.Tensor) -> torch.Tensor:
                return Mean.apply(t)

        return Member()


@pytest.mark.parametrize("name", ["cae", "gradcon"])
def test_two_workers_with_sync_take_exactly_the_global_batch_step(task, name):
    x = torch.from_numpy(task[0][:24, None]).float() / 255
    torch.manual_seed(0)
    single = make(name, {})
    workers, group = [copy.deepcopy(single) for _ in range(2)], ThreadGroup(2)
    for step in range(3):
        batch = x[8 * step: 8 * step + 8]
        single.step(batch, LocalBatch.alone(8), torch.Generator())
        # Worker r holds images 4r..4r+3 of the global batch of 8: scale = N * n_r / B = 2 * 4 / 8.
        threads = [threading.Thread(target=w.step, args=(batch[4 * r: 4 * r + 4], LocalBatch(torch.arange(4), 1.0, 4,
                                                                                              8, 4 * r),
                                                         torch.Generator(), group.member(r)))
                   for r, w in enumerate(workers)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for w in workers:
        for a, b in zip(w.state_tensors().values(), single.state_tensors().values()):
            torch.testing.assert_close(a.double(), b.double(), rtol=1e-5, atol=1e-6)
