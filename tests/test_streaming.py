"""Stream mode's core (no Ray): workers train from their own shards, and each step is the step one process
takes on the union of the workers' local batches."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gradcon_core.detectors.registry import create_detector
from gradcon_core.metrics import auroc
from gradcon_core.training.loop import StreamedData, run_steps, train_epochs
from gradcon_core.training.parallel import streamed_batches, training_generators
from tests.conftest import gloo_group

# Two workers with unequal shards (Ray Data hands out whole blocks): rank 0 takes 5 steps, rank 1 takes 3,
# then joins with weight 0.
SHARDS = [list(range(0, 25)), list(range(25, 40))]
LOCAL_BATCH = 6
VAL = list(range(40, 52))
ANOMALIES = list(range(52, 58))


@pytest.fixture(scope="module")
def images(mnist_train):
    x, y = mnist_train
    rows = np.concatenate([np.flatnonzero(y == 0)[:52], np.flatnonzero(y == 7)[:6]])
    return torch.from_numpy(x[rows]).unsqueeze(1).float() / 255


def _detector(name: str, **params):
    torch.manual_seed(0)
    return create_detector(name, device="cpu", **params)


def _epoch_batches(rows: list[int], epoch: int, rank: int) -> list[list[int]]:
    """A worker's local batches of an epoch: its shard in a per-epoch order (what Ray Data's shuffle does)."""
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(100 * epoch + rank)).tolist()
    return [[rows[i] for i in order[k:k + LOCAL_BATCH]] for k in range(0, len(rows), LOCAL_BATCH)]


def _streamed(x: torch.Tensor, rank: int, world: int, log: list) -> StreamedData:
    val = VAL[rank::world] + ANOMALIES[rank::world]

    def train(epoch: int):
        for ids in _epoch_batches(SHARDS[rank], epoch, rank):
            log.append((epoch, ids))
            yield x[ids]

    def validation():
        for k in range(0, len(val), 5):
            ids = val[k:k + 5]
            yield x[ids], torch.tensor([i in ANOMALIES for i in ids])

    def train_rows():
        return (x[ids] for ids in _epoch_batches(SHARDS[rank], 0, rank))

    return StreamedData(train, train_rows, validation, rows=40, val_rows=len(VAL), anomalies=len(ANOMALIES),
                        fingerprint="t")


def _worker(rank: int, world: int, store: str, x: torch.Tensor, name: str, params: dict, out: str) -> None:
    from gradcon_core.training.parallel import AllReduceMean, StepClock

    with gloo_group(rank, world, store):
        det, log, reports, clock = _detector(name, **params), [], [], StepClock()
        train_epochs(det, _streamed(x, rank, world, log), epochs=2, batch_size=12, seed=0, rank=rank,
                     world_size=world, sync=AllReduceMean(world, clock), on_epoch=lambda r: reports.append(r.metrics),
                     clock=clock)
        torch.save({"state": det.state_tensors(), "log": log, "reports": reports}, f"{out}.{rank}")


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("name, params", [("gradcon", {}), ("gradcon", {"epsilon": 0.15, "attack_steps": 2}),
                                          ("cae", {})])
def test_two_streaming_workers_take_the_steps_of_one_process_on_the_union_of_their_batches(
        images, name, params, tmp_path):
    out = str(tmp_path / "worker")
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), images, name, params, out), nprocs=2,
                       start_method="spawn")
    workers = [torch.load(f"{out}.{r}", weights_only=False) for r in range(2)]
    for k, v in workers[0]["state"].items():  # every rank ends with the same state
        torch.testing.assert_close(workers[1]["state"][k], v, rtol=0, atol=0, msg=k)

    # Replay: each step's global batch is rank 0's local batch then rank 1's (rank order), in one process.
    single = _detector(name, **params)
    _, noise = training_generators(0)
    for epoch in range(2):
        steps = [[ids for e, ids in w["log"] if e == epoch] for w in workers]
        assert [len(s) for s in steps] == [5, 3]
        global_batches = [images[sum((s[t] for s in steps if t < len(s)), [])] for t in range(5)]
        run_steps(single, streamed_batches(global_batches, images[:1]), noise)
    for k, v in single.state_tensors().items():
        torch.testing.assert_close(workers[0]["state"][k].double(), v.double(), rtol=1e-5, atol=1e-5, msg=k)

    # Validation: the mean over both workers' shares, and AUROC over every worker's scores. The mean is exact
    # for per-image losses (cae); GradCon's validation J has a per-batch gradient term (official: batches of 64),
    # so the workers' batches of their shares give a slightly different value.
    final = workers[0]["reports"][-1]
    assert final["val_loss"] == pytest.approx(single.validation_loss(images[VAL]), rel=1e-5 if name == "cae" else 1e-2)
    scores = single.decision_function(images[VAL + ANOMALIES])
    assert final["val_auroc"] == pytest.approx(auroc(scores, np.arange(len(scores)) >= len(VAL)), abs=1e-6)
    # Where the steps' time went: only GradCon's constraint all-reduces inner gradients.
    timing = {"images_per_s", "step_compute_ms", "step_inner_allreduce_ms", "step_final_allreduce_ms",
              "step_data_wait_ms"}
    assert timing <= final.keys() and all(final[k] >= 0 for k in timing)
    assert "first_step_s" in workers[0]["reports"][0] and "first_step_s" not in final
    assert final["step_compute_ms"] > 0 and final["step_final_allreduce_ms"] > 0
    assert (final["step_inner_allreduce_ms"] > 0) == (name == "gradcon")
    assert {k: v for k, v in workers[1]["reports"][-1].items() if k not in timing} == {
        k: v for k, v in final.items() if k not in timing}  # every rank reports the same global metrics


def test_a_detector_that_needs_the_whole_class_refuses_to_stream(images):
    data = _streamed(images, 0, 1, [])
    for name, params, why in [("deep_svdd", {}, "prepare"), ("ocsvm", {}, "fitted in one go"),
                              ("gradcon", {"epsilon": 0.1, "attack_refresh": "epoch"}, "attack_refresh=epoch")]:
        with pytest.raises(ValueError, match=f"data_mode=stream cannot train {name}.*{why}"):
            train_epochs(_detector(name, **params), data, epochs=1, batch_size=12, seed=0)


def test_one_streaming_process_equals_fit_on_the_same_batches(images):
    """World size 1: train_epochs on a stream is run_steps on its batches, step for step."""
    det, log = _detector("gradcon"), []
    train_epochs(det, _streamed(images, 0, 1, log), epochs=1, batch_size=6, seed=0)
    same = _detector("gradcon")
    _, noise = training_generators(0)
    run_steps(same, streamed_batches([images[ids] for _, ids in log], images[:1]), noise)
    for k, v in same.state_tensors().items():
        torch.testing.assert_close(det.state_tensors()[k], v, rtol=0, atol=0, msg=k)
