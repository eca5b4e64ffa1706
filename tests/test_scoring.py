"""The vectorized scorers against the official batch-size-1 loop, written out plainly; their batch size."""
import copy
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gradcon_core import create_model
from gradcon_core.detectors import scoring
from gradcon_core.detectors.objective import ReferenceGradients, constraint_layers, gradcon_step
from gradcon_core.detectors.scoring import (
    CPU_WORKING_SET,
    MAX_BATCH,
    score_batch_size,
    score_components,
    scoring_bytes_per_image,
)

BETA = 0.12


def loop_scores(model, refs, x):
    """Per image: forward, MSE, backward, cosine of each decoder weight gradient with its reference."""
    scores, recons = [], []
    layers = constraint_layers(model)
    for i in range(len(x)):
        model.zero_grad()
        xi = x[i : i + 1]
        recon_loss = F.mse_loss(model(xi), xi)
        recon_loss.backward()
        cos = 0
        for layer, ref in zip(layers, refs):
            cos += F.cosine_similarity(layer.weight.grad.view(-1, 1), ref.view(-1, 1), dim=0)
        cos = cos / len(layers)
        scores.append(float(recon_loss) + BETA * float(-cos))
        recons.append(float(recon_loss))
    model.zero_grad()
    return torch.tensor(scores, dtype=torch.float64), torch.tensor(recons, dtype=torch.float64)


@pytest.fixture(scope="module")
def trained():
    """A model a few steps into GradCon training, with real (not random) reference gradients."""
    torch.manual_seed(1)
    model = create_model("gradcon_cae", in_channels=1)
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    data = torch.rand(6, 16, 1, 28, 28) ** 3
    for x in data:
        gradcon_step(model, reference, opt, x, alpha=0.03)
    return model, reference


@pytest.mark.parametrize("method", ["fast", "vmap"])
@pytest.mark.parametrize("batch_size", [1, 3, 17, 64])
def test_batched_scores_equal_the_batch_size_one_loop(trained, method, batch_size):
    model, reference = trained
    x = torch.rand(batch_size, 1, 28, 28) ** 2
    expected, expected_recon = loop_scores(model, reference.tensors, x)
    got = score_components(model, reference.tensors, x, BETA, method)
    torch.testing.assert_close(got["score"].double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["recon_error"].double(), expected_recon, rtol=1e-5, atol=0)
    torch.testing.assert_close(got["score"], got["recon_error"] + BETA * got["grad_score"])


@pytest.mark.parametrize("method", ["fast", "vmap"])
@pytest.mark.parametrize("name", ["gradcon_cae", "arae_mlp"])
def test_scores_on_three_channel_models_with_random_references(name, method):
    model = create_model(name, in_channels=3)
    refs = [torch.randn_like(layer.weight) for layer in constraint_layers(model)]
    x = torch.rand(5, 3, 28, 28)
    expected, _ = loop_scores(model, refs, x)
    got = score_components(model, refs, x, BETA, method)["score"]
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=0)


def test_grad_score_is_zero_before_any_reference_exists():
    model = create_model("gradcon_cae")
    refs = ReferenceGradients.for_model(model).tensors
    out = score_components(model, refs, torch.rand(4, 1, 28, 28), BETA)
    assert torch.equal(out["grad_score"], torch.zeros(4))


def test_scoring_works_when_called_under_no_grad(trained):
    model, reference = trained
    x = torch.rand(3, 1, 28, 28)
    with torch.no_grad():
        got = score_components(model, reference.tensors, x, BETA)["score"]
    torch.testing.assert_close(got.double(), loop_scores(model, reference.tensors, x)[0], rtol=1e-5, atol=0)


def test_unknown_scoring_method_is_rejected(trained):
    model, reference = trained
    with pytest.raises(ValueError, match="scoring method"):
        score_components(model, reference.tensors, torch.rand(1, 1, 28, 28), BETA, method="loop")


def realistic_references(model, channels):
    """Reference gradients as training makes them: the mean gradient of other images (cosines far from 0)."""
    torch.manual_seed(2)
    x = torch.rand(8, channels, *model.input_size) ** 2
    layers = constraint_layers(model)
    return [g.detach() for g in torch.autograd.grad(F.mse_loss(model(x), x), [layer.weight for layer in layers])]


def loop_grad_scores(model, refs, x):
    """The official batch-size-1 gradient score, mean_l -cos(g_l, ref_l), per image, in float64."""
    layers = constraint_layers(model)
    out = []
    for i in range(len(x)):
        grads = torch.autograd.grad(F.mse_loss(model(x[i: i + 1]), x[i: i + 1]), [layer.weight for layer in layers])
        cos = [F.cosine_similarity(g.flatten(), r.flatten(), dim=0) for g, r in zip(grads, refs)]
        out.append(-torch.stack(cos).mean())
    return torch.stack(out).double().detach()


AT_SIZE = [("gradcon_cae", 3, 32), ("gradcon_cae", 3, 64), ("gradcon_cae", 3, 128), ("gradcon_cae", 1, 29),
           ("gradcon_cae", 1, (24, 40)), ("latent_ae", 3, 64)]


@pytest.mark.parametrize("method", ["fast", "vmap"])
@pytest.mark.parametrize(("name", "channels", "size"), AT_SIZE)
def test_batched_scores_equal_the_loop_at_every_size(name, channels, size, method):
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, image_size=size)
    refs = realistic_references(model, channels)
    x = torch.rand(5, channels, *model.input_size)
    expected_grad = loop_grad_scores(model, refs, x)
    assert expected_grad.abs().mean() > 0.05  # cosines that a wrong layer would visibly change
    expected, _ = loop_scores(model, refs, x)
    got = score_components(model, refs, x, BETA, method)
    # atol: a mean of cosines can come out near 0 where relative error means nothing; 1e-7 is float32 rounding.
    # So can the score, recon + beta * grad_score, whose terms have either sign (on an AMD EPYC one score of
    # 8.9e-4 differed by 1.3e-8, 1.4e-5 relative, from the loop's).
    torch.testing.assert_close(got["grad_score"].double(), expected_grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(got["score"].double(), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize(("name", "channels", "size"), [("gradcon_cae", 1, 28), ("gradcon_cae", 3, 64),
                                                        ("gradcon_cae", 3, 128), ("latent_ae", 3, 64)])
def test_batched_scores_equal_the_loop_on_cuda(name, channels, size, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)  # TF32 would be a 1e-3 scorer
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch.manual_seed(0)
    model = create_model(name, in_channels=channels, image_size=size).cuda()
    refs = realistic_references(model.cpu(), channels)
    model.cuda()
    refs = [r.cuda() for r in refs]
    x = torch.rand(17, channels, *model.input_size, device="cuda")
    expected_grad = loop_grad_scores(model, refs, x).cpu()
    got = score_components(model, refs, x, BETA)["grad_score"].double().cpu()
    torch.testing.assert_close(got, expected_grad, rtol=1e-5, atol=1e-7)


def test_score_batch_size_shrinks_with_the_image_and_fits_the_budget():
    budget = 64 * 2**20
    sizes = [score_batch_size(create_model("gradcon_cae", in_channels=3, image_size=s), "cpu", budget)
             for s in (28, 64, 128, 256)]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] > 4 * sizes[-1] >= 4
    for s, batch in zip((28, 64, 128, 256), sizes):
        model = create_model("gradcon_cae", in_channels=3, image_size=s)
        assert batch * scoring_bytes_per_image(model) <= budget < (batch + 1) * scoring_bytes_per_image(model)
    tiny = create_model("gradcon_cae", in_channels=3, image_size=256)
    assert score_batch_size(tiny, "cpu", budget_bytes=1) == 1  # one image at a time, never zero
    assert score_batch_size(create_model("gradcon_cae"), "cpu", budget_bytes=2**40) == MAX_BATCH


def test_default_cpu_batch_stays_within_the_working_set_and_the_available_memory(monkeypatch):
    model = create_model("gradcon_cae", in_channels=3, image_size=256)
    batch = score_batch_size(model, "cpu")
    assert 1 <= batch < 4096 and batch * scoring_bytes_per_image(model) <= CPU_WORKING_SET
    monkeypatch.setattr(scoring, "available_memory", lambda: 40 * 2**20)  # a small pod: a quarter of it
    model = create_model("gradcon_cae", in_channels=3, image_size=64)
    batch = score_batch_size(model, "cpu")
    assert batch * scoring_bytes_per_image(model) <= 10 * 2**20 < (batch + 1) * scoring_bytes_per_image(model)


def test_the_memory_estimate_covers_what_scoring_really_takes():
    status = Path("/proc/self/status")
    if not status.exists() or not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux's peak-RSS counters")

    def read(key):
        return next(int(line.split()[1]) * 1024 for line in status.read_text().splitlines() if line.startswith(key))

    model = create_model("gradcon_cae", in_channels=3, image_size=96)
    refs = [torch.randn_like(layer.weight) for layer in constraint_layers(model)]
    x = torch.rand(24, 3, 96, 96)
    score_components(model, refs, x[:2], BETA)  # first-call allocations
    before = read("VmRSS:")
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak to now
    score_components(model, refs, x, BETA)
    assert read("VmHWM:") - before <= len(x) * scoring_bytes_per_image(model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_memory_estimate_covers_what_scoring_really_takes_on_cuda():
    model = create_model("gradcon_cae", in_channels=3, image_size=128).cuda()
    refs = [torch.randn_like(layer.weight) for layer in constraint_layers(model)]
    batch = score_batch_size(model)
    assert batch * scoring_bytes_per_image(model) <= 0.5 * torch.cuda.mem_get_info()[0] + 1
    x = torch.rand(min(batch, 256), 3, 128, 128, device="cuda")
    score_components(model, refs, x[:2], BETA)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    score_components(model, refs, x, BETA)
    assert torch.cuda.max_memory_allocated() - before <= len(x) * scoring_bytes_per_image(model)


def test_estimating_memory_leaves_the_model_as_it_was():
    model = create_model("deep_svdd_lenet")  # BatchNorm: a training-mode forward would move its statistics
    model.decoder = model.fc  # scoring_bytes_per_image wants constrainable layers; any Linear will do
    state = {k: v.clone() for k, v in model.state_dict().items()}
    scoring_bytes_per_image(model)
    assert model.training and all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="scoring method"):
        scoring_bytes_per_image(model, method="loop")


@pytest.mark.parametrize("name", ["gradcon", "cae", "deep_svdd"])
def test_a_detectors_default_scoring_batch_comes_from_the_memory_estimate(name):
    """decision_function's default batch fits the CPU budget at 256x256x3 (256 images would not)."""
    from gradcon_core.detectors.registry import create_detector

    small = create_detector(name, in_channels=1, device="cpu")
    assert small.score_batch_size == small.cpu_score_batch_size  # 28x28: capped for the cache, not by memory
    det = create_detector(name, in_channels=3, model_kwargs={"image_size": 256}, device="cpu")
    per_image = scoring.scoring_bytes_per_image(det.model)
    assert det.score_batch_size * per_image <= scoring.CPU_WORKING_SET < det.cpu_score_batch_size * per_image
    x = torch.rand(det.score_batch_size + 1, 3, 256, 256)  # two batches, the last of one image
    assert det.decision_function(x).shape == (len(x),)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_uint8_images_cross_to_the_gpu_as_uint8_and_score_as_their_floats_do(trained):
    """On a GPU, uint8 images go to the device as uint8 (pinned, asynchronous) and become floats there."""
    from gradcon_core.detectors.gradcon import GradConDetector

    model, reference = trained
    det = GradConDetector(copy.deepcopy(model), device="cuda", score_batch_size=7)
    det.reference.load_state_dict(reference.state_dict())
    images = (torch.rand(20, 28, 28).numpy() * 255).round().astype(np.uint8)
    np.testing.assert_allclose(det.decision_function(images), det.decision_function(images.astype(np.float32)[:, None]
                                                                                     / 255), rtol=1e-5, atol=1e-7)
