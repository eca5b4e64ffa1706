"""ARAE: the latent PGD attack, the adversarial loss inside GradCon and every other autoencoder, and exact data
parallelism with it."""
import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from gradcon_core import GradConDetector, create_model, list_detectors
from gradcon_core.detectors.adversarial import LatentAttack, arae_loss
from gradcon_core.detectors.autoencoder import AutoencoderDetector
from gradcon_core.detectors.objective import gradcon_step
from gradcon_core.detectors.registry import create_detector, detector_class
from gradcon_core.training.loop import TrainingData, run_steps
from gradcon_core.training.parallel import training_generators
from tests.conftest import gloo_group


@pytest.fixture(scope="module")
def zeros(mnist_train):
    x, y = mnist_train
    return torch.from_numpy(x[y == 0][:96]).unsqueeze(1).float() / 255


def _detector(**kwargs) -> GradConDetector:
    torch.manual_seed(0)
    return GradConDetector(create_model("gradcon_cae"), device="cpu", **kwargs)


def _latent_distance(model, a, b):
    with torch.no_grad():
        return (model.encoder(a) - model.encoder(b)).pow(2).flatten(1).mean(1)


def test_attack_stays_in_the_eps_ball_and_the_image_box_and_beats_its_random_start(zeros):
    model = _detector().model
    attack = LatentAttack(epsilon=0.2, steps=10)
    start = attack.random_start(zeros.shape, torch.Generator().manual_seed(0))
    x_adv = attack.craft(model, zeros, start)
    assert (x_adv - zeros).abs().max() <= 0.2 + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    from_start = _latent_distance(model, (zeros + start).clamp(0, 1), zeros)
    attacked = _latent_distance(model, x_adv, zeros)
    assert (attacked > from_start).float().mean() > 0.95, (attacked / from_start)
    assert attacked.mean() > 2 * from_start.mean()
    assert not x_adv.requires_grad and model.training


def test_epsilon_zero_is_plain_training_exactly(zeros):
    det = _detector(epsilon=0.0).fit(zeros, epochs=2, batch_size=16, seed=3)
    plain = _detector()
    order = torch.Generator().manual_seed(3)
    for _ in range(2):
        for idx in torch.randperm(len(zeros), generator=order).split(16):
            gradcon_step(plain.model, plain.reference, plain.optimizer, zeros[idx], plain.settings.alpha)
    for k, v in plain.state_tensors().items():
        assert torch.equal(det.state_tensors()[k], v), k


def test_an_arae_step_descends_the_adversarial_loss_under_the_constraint(zeros):
    det = _detector(epsilon=0.2, attack_steps=5)
    det.fit(zeros, epochs=1, batch_size=32, seed=0)
    x_adv = det.attack.craft(det.model, zeros[:32], det.attack.random_start(zeros[:32].shape,
                                                                           torch.Generator().manual_seed(1)))
    expected = float(arae_loss(det.model, zeros[:32], x_adv, 0.1).detach())
    stats = gradcon_step(det.model, det.reference, det.optimizer, zeros[:32], det.settings.alpha, x_adv=x_adv,
                         gamma=0.1)
    assert stats.recon == pytest.approx(expected, rel=1e-5) and stats.grad_loss < 0
    assert expected > float(torch.nn.functional.mse_loss(det.model(zeros[:32]), zeros[:32])) * 0.5


@pytest.mark.parametrize("refresh", ["batch", "epoch"])
def test_arae_training_learns_and_round_trips(zeros, refresh, tmp_path, mnist_test):
    det = _detector(epsilon=0.2, attack_steps=3, attack_refresh=refresh)
    det.fit(zeros, epochs=3, batch_size=16, seed=0)
    losses = [h["recon"] for h in det.history_]
    assert losses[-1] < losses[0]
    loaded = GradConDetector.load(det.save(tmp_path / "ckpt"))
    assert (loaded.attack.epsilon, loaded.attack.refresh) == (0.2, refresh)
    xt, _ = mnist_test
    x = torch.from_numpy(xt[:20]).unsqueeze(1).float() / 255
    np.testing.assert_array_equal(loaded.decision_function(x), det.decision_function(x))


AUTOENCODERS = [n for n in list_detectors() if issubclass(detector_class(n), AutoencoderDetector)]


def test_every_autoencoder_but_puzzle_ae_takes_epsilon():
    """Puzzle-AE keeps its own paper's epsilon (an FGSM step against the reconstruction loss)."""
    assert AUTOENCODERS == ["aae", "cae", "dae", "gradcon", "vae", "vae_grad", "wae"]
    for name in AUTOENCODERS:
        assert {"epsilon", "gamma", "attack_steps", "attack_refresh"} <= set(detector_class(name).param_names())
    with pytest.raises(TypeError, match="epsilon"):
        create_detector("deep_svdd", epsilon=0.1)  # not an autoencoder: nothing to attack


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_arae_trains_every_autoencoder_on_its_attacked_images(zeros, name):
    fits = {}
    for epsilon in (0.0, 0.2):
        torch.manual_seed(0)
        det = create_detector(name, device="cpu", epsilon=epsilon, attack_steps=3)
        torch.manual_seed(0)
        det.fit(zeros[:48], epochs=1, batch_size=16, seed=0)
        fits[epsilon] = det
    clean, robust = fits[0.0], fits[0.2]
    assert robust.attack.enabled and robust.get_params()["epsilon"] == 0.2
    if name != "gradcon":  # GradCon reports the ARAE loss as its recon; the others add the code term on its own
        assert robust.history_[0]["latent"] > 0 and "latent" not in clean.history_[0]
    moved = [not torch.equal(a, b) for a, b in zip(clean.model.parameters(), robust.model.parameters())]
    assert sum(moved) >= len(moved) - 1, moved  # (the output bias may take Adam's same lr-sized steps in both)


def test_the_cae_adversarial_loss_is_araes(zeros):
    torch.manual_seed(0)
    det = create_detector("cae", device="cpu", epsilon=0.2, attack_steps=3, gamma=0.3)
    x = zeros[:16]
    x_adv = det.attack.craft(det.model, x, det.attack.random_start(x.shape, torch.Generator().manual_seed(0)))
    torch.testing.assert_close(det.training_losses(x, x_adv)["loss"], arae_loss(det.model, x, x_adv, 0.3))


def test_bad_arae_settings_are_clear_errors():
    with pytest.raises(ValueError, match="epsilon >= 0"):
        _detector(epsilon=-0.1)
    with pytest.raises(ValueError, match="unknown ARAE refresh"):
        _detector(epsilon=0.1, attack_refresh="sometimes")


def _epoch(det, x, order, noise, rank=0, world=1, sync=None) -> None:
    """One memory-mode epoch of the training loop, in global batches of 12."""
    run_steps(det, TrainingData(x).steps(det, 0, order, noise, 12, rank, world, sync, None), noise, sync)


def _worker(rank: int, world: int, store: str, x: torch.Tensor, kwargs: dict, out: str) -> None:
    from gradcon_core.training.parallel import AllReduceMean

    with gloo_group(rank, world, store):
        det = _detector(**kwargs)
        order, noise = training_generators(0)
        for _ in range(2):
            _epoch(det, x, order, noise, rank, world, AllReduceMean(world))
        if rank == 0:
            torch.save(det.state_tensors(), out)


@pytest.mark.slow  # worker processes
@pytest.mark.parametrize("refresh", ["batch", "epoch"])
def test_two_processes_with_arae_take_the_single_process_steps(zeros, refresh, tmp_path):
    """The distributed epoch (ranks, all-reduce, sliced random starts) equals one process on the global batch."""
    x, kwargs = zeros[:40], dict(epsilon=0.15, attack_steps=3, attack_refresh=refresh)
    out = str(tmp_path / "rank0.pt")
    mp.start_processes(_worker, args=(2, str(tmp_path / "store"), x, kwargs, out), nprocs=2, start_method="spawn")
    single = _detector(**kwargs)
    order, noise = training_generators(0)
    for _ in range(2):
        _epoch(single, x, order, noise)  # 40 images: the last global batch of 4 splits 2 + 2
    distributed = torch.load(out, weights_only=True)
    for k, v in single.state_tensors().items():
        torch.testing.assert_close(distributed[k].double(), v.double(), rtol=1e-5, atol=1e-6, msg=k)
