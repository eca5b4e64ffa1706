import math

import pytest
import torch
import yaml

from gradcon_core import create_model, list_models
from gradcon_core.detectors.objective import ReferenceGradients, constraint_layers, gradcon_step


@pytest.mark.parametrize(("channels", "expected"), [(1, 230_721), (3, 232_771)])
def test_gradcon_cae_parameter_count(channels, expected):
    model = create_model("gradcon_cae", in_channels=channels)
    assert sum(p.numel() for p in model.parameters()) == expected


def test_gradcon_cae_shapes_follow_the_official_network():
    model = create_model("gradcon_cae", in_channels=1)
    latent = model.encoder(torch.zeros(2, 1, 28, 28))
    assert latent.shape == (2, 64, 3, 3)
    layers = constraint_layers(model)
    shapes = [tuple(layer.weight.shape) for layer in layers]
    assert shapes == [(64, 64, 4, 4), (64, 32, 4, 4), (32, 32, 4, 4), (32, 1, 4, 4)]


def test_arae_mlp_is_the_papers_dense_sigmoid_network():
    model = create_model("arae_mlp")
    assert sum(p.numel() for p in model.parameters()) == 1_132_944  # the official Keras model's count
    assert model.encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 128)
    assert [tuple(layer.weight.shape) for layer in constraint_layers(model)] == [(256, 128), (512, 256), (784, 512)]


AUTOENCODERS = ("gradcon_cae", "arae_mlp", "latent_ae", "conv_vae", "aae_net")


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_takes_images_and_autoencoders_reconstruct_them(name):
    model = create_model(name, in_channels=3)
    x = torch.rand(4, 3, *model.input_size)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and len(out) == 4
    if name in AUTOENCODERS:
        assert out.shape == x.shape
        assert 0 <= float(out.min()) and float(out.max()) <= 1
    assert model.spec["name"] == name and model.spec["in_channels"] == 3 and model.in_channels == 3


def test_unknown_model_name_lists_the_registered_ones():
    with pytest.raises(ValueError, match="gradcon_cae"):
        create_model("no_such_model")


def test_gradcon_cae_at_28_keeps_the_official_paddings():
    model = create_model("gradcon_cae")
    assert [m.padding for m in model.encoder if isinstance(m, torch.nn.Conv2d)] == [(2, 2)] * 4
    assert [(m.padding, m.output_padding) for m in constraint_layers(model)] == [
        ((2, 2), (0, 0)), ((1, 1), (0, 0)), ((2, 2), (0, 0)), ((1, 1), (0, 0))]


SIZES = [32, 64, 128, (24, 40), 29]  # square, non-square, odd


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("name", list_models())
def test_every_model_takes_images_of_its_size_and_autoencoders_return_that_exact_shape(name, size):
    if name == "arae_mlp" and size == 128:
        pytest.skip("a dense network by pixel count: 50M parameters, nothing new to learn here")
    model = create_model(name, in_channels=3, image_size=size)
    hw = (size, size) if isinstance(size, int) else size
    assert model.input_size == hw and model.in_channels == 3
    x = torch.rand(2, 3, *hw)
    with torch.no_grad():
        out = model(x)
    assert torch.isfinite(out).all() and len(out) == 2
    if name in AUTOENCODERS:
        assert out.shape == x.shape
    rebuilt = create_model(**yaml.safe_load(yaml.safe_dump(model.spec)))  # as a checkpoint rebuilds it
    assert rebuilt.input_size == hw
    assert [p.shape for p in rebuilt.parameters()] == [p.shape for p in model.parameters()]


@pytest.mark.parametrize("size", [28, 32, 64, 128, 256, (24, 40), 29, 37])
def test_gradcon_cae_follows_the_design_rules_at_every_size(size):
    model = create_model("gradcon_cae", image_size=size)
    convs = [m for m in model.encoder if isinstance(m, torch.nn.Conv2d)]
    latent = model.encoder(torch.zeros(1, 1, *model.input_size)).shape
    assert latent[1:] == model.latent_shape
    assert 3 <= min(latent[2:]) <= 4  # a small spatial latent
    assert all(m.kernel_size == (4, 4) and m.stride == (2, 2) for m in convs)
    widths = [m.out_channels for m in convs]
    assert widths[:4] == [32, 32, 64, 64][: len(widths)] and widths == sorted(widths) and max(widths) <= 256
    decoder = constraint_layers(model)
    assert [m.in_channels for m in decoder] == widths[::-1]  # the mirror
    assert isinstance(model.decoder[-1], torch.nn.Sigmoid)


def test_deep_svdd_at_32_has_the_cifar10_lenet_convolutions():
    model = create_model("deep_svdd_lenet", in_channels=3, image_size=32)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(m.in_channels, m.out_channels) for m in convs] == [(3, 32), (32, 64), (64, 128)]
    assert model.fc.in_features == 128 * 4 * 4


@pytest.mark.parametrize("bad", [4, 0, (28,), (28, 28, 3), "28", 28.0])
def test_bad_image_sizes_are_refused_with_the_value_named(bad):
    with pytest.raises(ValueError, match="image"):
        create_model("gradcon_cae", image_size=bad)


@pytest.mark.parametrize("name", AUTOENCODERS)
def test_a_few_gradcon_steps_train_every_autoencoder_at_64x64_rgb(name):
    torch.manual_seed(0)
    model = create_model(name, in_channels=3, image_size=64)
    autoencoder = [*model.encoder.parameters(), *model.decoder.parameters()]  # not AAE's discriminator
    before = [p.detach().clone() for p in autoencoder]
    reference = ReferenceGradients.for_model(model)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(4, 3, 64, 64)
    stats = [gradcon_step(model, reference, opt, x, alpha=0.03) for _ in range(3)]
    assert all(math.isfinite(s.loss) for s in stats) and stats[-1].grad_loss != 0  # the constraint acted
    assert all(not torch.equal(a, b) for a, b in zip(before, autoencoder, strict=True))
