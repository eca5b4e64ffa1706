"""One settings mechanism: a detector's settings are its constructor's arguments, the same in every job."""
import importlib
from pathlib import Path

import numpy as np
import pytest

from gradcon_core import list_detectors
from gradcon_core.config import load_config
from gradcon_core.data.images import encode_png
from gradcon_core.detectors.registry import detector_class
from gradcon_core.detectors.settings import DetectorSettings
from jobs.eval import EvalConfig
from jobs.train import TrainConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_defaults_are_the_detectors_own():
    det = DetectorSettings().build(channels=1)
    assert det.name == "gradcon" and det.get_params() == detector_class("gradcon").param_defaults()


def test_short_forms_and_params_reach_the_detector():
    det = DetectorSettings(alpha=0.05, params={"beta": 0.2, "epsilon": 0.1}).build(channels=1)
    assert (det.settings.alpha, det.settings.beta, det.settings.epsilon, det.attack.epsilon) == (0.05, 0.2, 0.1, 0.1)
    assert DetectorSettings(model="arae_mlp").build(channels=1).model.spec["name"] == "arae_mlp"
    with pytest.raises(ValueError, match=r"\['alpha'\] given both"):
        DetectorSettings(alpha=0.05, params={"alpha": 0.1}).detector_params()
    with pytest.raises(ValueError, match="has no network to choose"):
        DetectorSettings(detector="kde", model="gradcon_cae").build(channels=1)


def test_the_command_line_sets_any_detector_setting():
    cfg = load_config(TrainConfig, None, ["detector=deep_svdd", "params={objective: soft-boundary}",
                                          "params.nu=0.05", "lr=1e-4"])
    assert cfg.params == {"objective": "soft-boundary", "nu": 0.05}
    det = cfg.build(channels=1)
    assert (det.settings.objective, det.settings.nu, det.settings.lr) == ("soft-boundary", 0.05, 1e-4)
    # YAML reads 1e-7 as a string; settings given on a command line are numbers where they read as one.
    assert load_config(EvalConfig, None, ["params.lr=1e-7"]).build(channels=1).settings.lr == 1e-7


def test_todays_config_file_still_loads():
    det = load_config(TrainConfig, CONFIGS / "mnist.yaml").build(channels=1)
    assert (det.settings.alpha, det.settings.beta, det.settings.lr) == (0.03, 0.12, 0.001)


@pytest.mark.parametrize("name", list_detectors())
def test_every_detector_saves_the_settings_it_was_built_with(name, tmp_path):
    cls = detector_class(name)
    assert "device" not in cls.param_names() and "model" not in cls.param_names()
    det = DetectorSettings(detector=name).build(channels=1)
    config = det.config()
    assert {k: config[k] for k in cls.param_names()} == det.get_params()


@pytest.mark.parametrize("cls_path, setting, problem", [
    ("jobs.train:TrainConfig", "alpha=nan", "finite"),
    ("jobs.train:TrainConfig", "params.nu=inf", "finite"),
    ("jobs.train:TrainConfig", "checkpoint_every=0", "at least 1"),
    ("jobs.train:TrainConfig", "name=../../x", "plain name"),
    ("jobs.train:TrainConfig", "resume=a/b", "plain name"),
    ("jobs.score:ScoreConfig", "threshold=nan", "finite"),
    ("jobs.score:ScoreConfig", "decode_threads=0", "at least 1"),
    ("jobs.score:ScoreConfig", "gpus_per_actor=-1", "at least 0"),
    ("jobs.score:ScoreConfig", "concurrency=0", "at least 1"),
    ("jobs.eval:EvalConfig", "epochs=0", "at least 1"),
])
def test_settings_no_run_could_mean_are_refused_by_name(cls_path, setting, problem):
    module, name = cls_path.split(":")
    cls = getattr(importlib.import_module(module), name)
    with pytest.raises(ValueError, match=rf"config {setting.split('=')[0].split('.')[0]}: .*{problem}"):
        load_config(cls, overrides=[setting])


def test_sane_settings_pass_the_checks():
    from jobs.score import ScoreConfig
    from jobs.train import TrainConfig

    cfg = load_config(TrainConfig, overrides=["alpha=0.03", "name=run-1", "max_failures=-1", "params.beta=0.1"])
    assert (cfg.alpha, cfg.name, cfg.max_failures) == (0.03, "run-1", -1)
    score = load_config(ScoreConfig, overrides=["checkpoint=c", "input=i", "output=o", "gpus_per_actor=0.25",
                                                "decode_threads=2"])
    assert score.decode_threads == 2


def test_local_paths_are_made_absolute_and_urls_kept(tmp_path, monkeypatch):
    """Ray runs workers and trials in directories of their own: a relative path must not reach them."""
    from jobs.score import ScoreConfig
    from jobs.tune import TuneConfig

    monkeypatch.chdir(tmp_path)
    cfg = load_config(TuneConfig, overrides=["data=data/sets/mnist"], extra={"search": {"alpha": "loguniform(1e-3,1)"}})
    assert (cfg.data, cfg.storage) == (str(tmp_path / "data/sets/mnist"), str(tmp_path / "runs"))
    score = load_config(ScoreConfig, overrides=["checkpoint=s3://b/runs/r/checkpoint", "input=images",
                                                "output=~/scores"])
    assert (score.checkpoint, score.input) == ("s3://b/runs/r/checkpoint", str(tmp_path / "images"))
    assert score.output == str(Path.home() / "scores")


def test_image_shape_comes_from_the_settings_else_the_recorded_shape_else_the_data(capsys):
    from gradcon_core.data.imageset import ImageShape

    recorded = ImageShape((96, 96), 3)

    def unread():
        raise AssertionError("the first image is read only when nothing else says the channel count")

    assert DetectorSettings().image_shape(recorded, unread) == recorded
    assert capsys.readouterr().err == ""
    resized = load_config(TrainConfig, None, ["image_size=64"])
    assert resized.image_size == [64] and resized.image_shape(recorded, unread) == ImageShape((64, 64), 3)
    assert "96x96 images are resized to 64x64" in capsys.readouterr().err
    rect = load_config(TrainConfig, None, ["image_size=48,64", "channels=3"])
    assert rect.image_shape(None, unread).image_size == (48, 64)
    # Nothing recorded: channels from the first image, size the network's default, with a notice.
    shape = DetectorSettings().image_shape(None, lambda: encode_png(np.zeros((10, 10, 3), np.uint8)))
    assert shape == ImageShape((28, 28), 3) and "records no image size" in capsys.readouterr().err
    with pytest.raises(ValueError, match="channels=1, but the image set's images have 3"):
        DetectorSettings(channels=1).image_shape(recorded, unread)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        DetectorSettings(channels=2).image_shape(None, unread)
    with pytest.raises(ValueError, match="image_size: must be at least 1"):
        load_config(TrainConfig, None, ["image_size=0,64"])
    with pytest.raises(ValueError, match="image_size must be an int or"):
        DetectorSettings(image_size=[8, 8, 8], channels=1).image_shape(None, unread)


@pytest.mark.parametrize("name", list_detectors())
def test_every_detector_takes_the_image_size_it_is_built_for(name):
    det = DetectorSettings(detector=name).build(channels=3, image_size=(36, 44))
    assert (det.channels, det.input_size) == (3, (36, 44))
