import pytest
import torch

from gradcon_core import create_model, list_models
from gradcon_core.objective import constraint_layers


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
