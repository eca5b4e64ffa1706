"""Our training step against a line-by-line transcription of the official one (ae_grad_reg.train)."""
import copy

import pytest
import torch
import torch.nn.functional as func

from gradcon_core import create_model
from gradcon_core.detectors.objective import ReferenceGradients, gradcon_step

ALPHA = 0.03


class AverageMeter:
    def __init__(self, shape):
        self.avg = torch.zeros(shape)
        self.sum = 0
        self.count = 0

    def update(self, val, n=1):
        self.sum += val * n
        self.count += n
        self.avg = self.sum / self.count


def official_train_step(model, ref_grad, optimizer, data, grad_loss_weight, nlayer=4):
    optimizer.zero_grad()
    recon_batch = model(data)
    recon_loss = func.mse_loss(recon_batch, data)
    grad_loss = 0
    for i in range(nlayer):
        wrt = model.decoder[int(2 * i)].weight
        target_grad = torch.autograd.grad(recon_loss, wrt, create_graph=True, retain_graph=True)[0]
        grad_loss += -1 * func.cosine_similarity(target_grad.view(-1, 1), ref_grad[i].avg.view(-1, 1), dim=0)
    if ref_grad[0].count == 0:
        grad_loss = torch.FloatTensor([0.0])
    else:
        grad_loss = grad_loss / nlayer
    loss = recon_loss + grad_loss_weight * grad_loss
    loss.backward()
    for i in range(nlayer):
        ref_grad[i].update(model.decoder[2 * i].weight.grad, 1)
    optimizer.step()


def test_steps_match_the_official_transcription():
    torch.manual_seed(3)
    ours = create_model("gradcon_cae", in_channels=1)
    theirs = copy.deepcopy(ours)
    reference = ReferenceGradients.for_model(ours)
    ref_grad = [AverageMeter(theirs.decoder[2 * i].weight.shape) for i in range(4)]
    opt_ours = torch.optim.Adam(ours.parameters(), lr=1e-3)
    opt_theirs = torch.optim.Adam(theirs.parameters(), lr=1e-3)
    batches = torch.rand(8, 16, 1, 28, 28) ** 2
    for x in batches:
        gradcon_step(ours, reference, opt_ours, x, ALPHA)
        official_train_step(theirs, ref_grad, opt_theirs, x, ALPHA)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=f"parameter {name}")
    assert int(reference.count) == ref_grad[0].count == 8
    for ours_ref, meter in zip(reference.tensors, ref_grad):
        torch.testing.assert_close(ours_ref, meter.avg, rtol=0, atol=1e-6)
    assert not torch.equal(next(ours.parameters()), next(create_model("gradcon_cae").parameters()))


def test_first_step_has_no_constraint_and_seeds_the_reference_with_the_recon_gradient():
    torch.manual_seed(0)
    model = create_model("gradcon_cae")
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    x = torch.rand(8, 1, 28, 28)
    stats = gradcon_step(model, reference, opt, x, ALPHA)
    assert stats.grad_loss == 0 and stats.loss == stats.recon
    recon_grad = torch.autograd.grad(func.mse_loss(model(x), x), model.decoder[0].weight)[0]
    torch.testing.assert_close(reference.tensors[0], recon_grad)
    second = gradcon_step(model, reference, opt, x, ALPHA)
    # Same batch, weights unchanged: the gradient is the reference, so -cos = -1.
    assert second.grad_loss == pytest.approx(-1.0, abs=1e-5)


def test_reference_is_a_cumulative_mean_of_total_loss_gradients():
    torch.manual_seed(0)
    model = create_model("gradcon_cae")
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    seen = []
    for x in torch.rand(5, 8, 1, 28, 28):
        gradcon_step(model, reference, opt, x, ALPHA)
        seen.append(model.decoder[6].weight.grad.clone())
    torch.testing.assert_close(reference.tensors[3], torch.stack(seen).mean(0), rtol=1e-5, atol=1e-7)


def test_references_are_buffers_in_the_state_dict():
    reference = ReferenceGradients.for_model(create_model("gradcon_cae"))
    assert set(reference.state_dict()) == {"ref_0", "ref_1", "ref_2", "ref_3", "count"}


def test_a_step_waits_on_nothing_and_a_loaded_reference_keeps_its_history():
    torch.manual_seed(0)
    model = create_model("gradcon_cae")
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    stats = gradcon_step(model, reference, opt, torch.rand(8, 1, 28, 28), ALPHA)
    # Values stay tensors (a GPU loop sums them on the device); the first-step test reads a host mirror.
    assert all(isinstance(v, torch.Tensor) and not v.requires_grad for v in vars(stats).values())
    fresh = ReferenceGradients.for_model(model)
    assert not fresh.started and reference.started
    fresh.load_state_dict(reference.state_dict())
    assert fresh.started  # so a resumed run applies the constraint from its first step
