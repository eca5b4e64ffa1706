"""The vectorized scorers against the official batch-size-1 loop, written out plainly."""
import pytest
import torch
import torch.nn.functional as F

from gradcon_core import create_model
from gradcon_core.objective import ReferenceGradients, constraint_layers, gradcon_step
from gradcon_core.scoring import score_components

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
