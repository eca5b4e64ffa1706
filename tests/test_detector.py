import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from gradcon_core import GradConDetector, create_model, evaluate, load_detector
from gradcon_core.training.checkpoint import (
    TRAINING_STATE_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    checkpoint_id,
    read_config,
)


@pytest.fixture(scope="module")
def fitted(mnist_train, mnist_test):
    """GradCon fitted on real images of digit 1; tested on 1s against other digits."""
    torch.manual_seed(0)
    x, y = mnist_train
    ones = np.flatnonzero(y == 1)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    before = {k: v.clone() for k, v in det.model.state_dict().items()}
    det.fit(x[ones[:1500]], epochs=4, batch_size=64, seed=0, x_val=x[ones[1500:1700]])
    xt, yt = mnist_test
    rng = np.random.default_rng(0)
    idx = np.concatenate([rng.choice(np.flatnonzero(yt == 1), 300, replace=False),
                          rng.choice(np.flatnonzero(yt != 1), 300, replace=False)])
    return det, before, xt[idx], yt[idx] != 1


def test_fit_moves_weights_and_learns_to_tell_ones_from_other_digits(fitted):
    det, before, x, is_anomaly = fitted
    after = det.model.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)
    assert int(det.reference.count) == 4 * int(np.ceil(1500 / 64))
    scores = det.decision_function(x)
    assert scores.dtype == np.float32 and scores.shape == (600,)
    assert np.std(scores) > 1e-4
    metrics = evaluate(scores, is_anomaly, det.threshold_)
    # A constant or random score sits at 0.5; reconstruction alone after 4 epochs is already above 0.8.
    assert metrics["auroc"] > 0.85, metrics
    assert len(det.history_) == 4 and {"loss", "recon", "grad_loss", "val_loss", "images_per_s"} <= set(det.history_[0])


def test_components_add_up_and_threshold_comes_from_validation(fitted):
    det, _, x, _ = fitted
    parts = det.score_components(x)
    np.testing.assert_allclose(parts["score"], parts["recon_error"] + det.settings.beta * parts["grad_score"],
                               rtol=1e-6)
    assert det.threshold_ is not None
    predicted = det.predict(x)
    assert set(np.unique(predicted)) <= {0, 1}
    np.testing.assert_array_equal(predicted, (parts["score"] > det.threshold_).astype(int))


def test_save_load_round_trip_gives_identical_scores(fitted, tmp_path):
    det, _, x, _ = fitted
    path = det.save(tmp_path / "ckpt", training_state={"epoch": 3, "step": 10})
    loaded = load_detector(path)
    assert isinstance(loaded, GradConDetector)
    np.testing.assert_array_equal(loaded.decision_function(x), det.decision_function(x))
    assert loaded.threshold_ == det.threshold_
    for a, b in zip(loaded.reference_gradients, det.reference_gradients):
        assert torch.equal(a, b)
    tensors = load_file(tmp_path / "ckpt" / WEIGHTS_FILE)
    assert {"reference.ref_0", "reference.count", "model.decoder.0.weight"} <= set(tensors)
    state = torch.load(tmp_path / "ckpt" / TRAINING_STATE_FILE, weights_only=True)
    assert state == {"epoch": 3, "step": 10}
    config = read_config(path)
    assert config["detector"] == "gradcon" and config["alpha"] == 0.03 and config["beta"] == 0.12
    assert config["model"] == {"name": "gradcon_cae", "in_channels": 1, "image_size": 28}
    assert len(checkpoint_id(path)) == 16


def test_a_run_folder_or_its_best_checkpoint_file_loads_the_best_checkpoint(fitted, tmp_path):
    """What a user holds after `gradcon train name=RUN`: the run's folder, with best_checkpoint pointing into it."""
    det, _, x, _ = fitted
    run = tmp_path / "runs" / "digit1"
    det.save(run / "checkpoint_000003")
    (run / "best_checkpoint").write_text(str(run / "checkpoint_000003"))
    for held in (run, run / "best_checkpoint", run / "checkpoint_000003"):
        np.testing.assert_array_equal(load_detector(str(held)).decision_function(x[:8]), det.decision_function(x[:8]))
    with pytest.raises(FileNotFoundError, match="is not a gradcon checkpoint"):
        load_detector(str(tmp_path / "runs"))


def test_loading_to_score_builds_no_optimizer(fitted, tmp_path):
    """A scoring actor's start-up: torch's optimizers import torch._dynamo (about a second on a CPU), so a
    detector loaded to score builds them only when training asks for them."""
    det, _, x, _ = fitted
    path = det.save(tmp_path / "ckpt")
    np.save(tmp_path / "x.npy", x[:8])
    script = ("import sys, numpy as np; from gradcon_core import load_detector; "
              f"det = load_detector({str(path)!r}); det.decision_function(np.load({str(tmp_path / 'x.npy')!r})); "
              "print('torch._dynamo' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          check=True).stdout.strip() == "False"
    loaded = load_detector(path)
    assert [type(o) for o in loaded.optimizers] == [type(o) for o in det.optimizers]


def test_threshold_lives_in_the_config_not_the_weights(fitted, tmp_path):
    det, _, x, _ = fitted
    det.save(tmp_path / "a")
    det.set_threshold(x, contamination=0.5 - 1e-9)
    det.save(tmp_path / "b")
    assert (tmp_path / "a" / WEIGHTS_FILE).read_bytes() == (tmp_path / "b" / WEIGHTS_FILE).read_bytes()
    assert read_config(tmp_path / "b")["threshold"] == pytest.approx(float(np.median(det.decision_function(x))))


def test_loading_something_that_is_not_a_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a gradcon checkpoint"):
        load_detector(tmp_path)


def _tampered(source, dest, config_text=None, tensors=None):
    """A copy of checkpoint `source` with its config.yaml text and/or its tensors replaced."""
    import shutil

    from safetensors.torch import save_file

    shutil.copytree(source, dest)
    if config_text is not None:
        (dest / "config.yaml").write_text(config_text)
    if tensors is not None:
        save_file(tensors, str(dest / WEIGHTS_FILE))
    return dest


def test_a_damaged_or_hostile_checkpoint_is_refused_at_load_naming_it(fitted, tmp_path):
    det, _, _, _ = fitted
    good = tmp_path / "good"
    det.save(good)
    text = (good / "config.yaml").read_text()
    weights = load_file(str(good / WEIGHTS_FILE))
    cases = {
        "tag": (text + "evil: !!python/object/apply:os.system [echo]\n", None, "not plain YAML"),
        "list": ("- 1\n- 2\n", None, "must be a mapping, got list"),
        "no_detector": (text.replace("detector: gradcon\n", ""), None, "names no detector"),
        "unknown": (text.replace("detector: gradcon\n", "detector: magic\n"), None, "unknown detector 'magic'"),
        "no_model": ("\n".join(line for line in text.splitlines() if not line.startswith("model:")
                                and not line.startswith("  ")) + "\n", None, "missing 'model'"),
        "threshold_nan": (text.replace("threshold:", "threshold: .nan\nx_threshold:"), None, "finite number"),
        "threshold_text": (text.replace("threshold:", "threshold: abc\nx_threshold:"), None, "finite number"),
        "shape": (None, {**weights, "model.encoder.0.weight": torch.zeros(3, 3)}, "size mismatch"),
        "missing": (None, {k: v for k, v in weights.items() if k != "model.decoder.0.bias"}, "Missing key"),
        "nan": (None, {**weights, "model.decoder.0.bias": weights["model.decoder.0.bias"] * float("nan")},
                "non-finite values"),
    }
    for name, (config_text, tensors, message) in cases.items():
        bad = _tampered(good, tmp_path / name, config_text, tensors)
        with pytest.raises(CheckpointError, match=message) as caught:
            load_detector(bad)
        assert str(bad) in str(caught.value), name
    (tmp_path / "torn").mkdir()
    (tmp_path / "torn" / "config.yaml").write_text(text)
    (tmp_path / "torn" / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(CheckpointError, match="not readable safetensors"):
        load_detector(tmp_path / "torn")


def test_fit_is_reproducible_for_a_seed(mnist_train):
    x = mnist_train[0][:256]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        det = GradConDetector(create_model("gradcon_cae"), device="cpu").fit(x, epochs=1, batch_size=64, seed=7)
        runs.append(det.decision_function(x[:32]))
    np.testing.assert_array_equal(runs[0], runs[1])


def test_output_init_mean_starts_at_the_class_mean_and_keeps_the_output_alive(mnist_train):
    """The fast-start recipe (not the official default): with seed 1's initial weights the official recipe's
    output on these 1000 fives collapses to one constant image within two epochs here (output spread 6e-5
    across images, recon 0.138); started at the class's mean intensity, it keeps telling images apart."""
    x, y = mnist_train
    fives = torch.from_numpy(x[y == 5][:1000]).unsqueeze(1).float() / 255
    torch.manual_seed(1)
    det = GradConDetector(create_model("gradcon_cae"), device="cpu", output_init="mean")
    det.prepare(fives)
    bias = det.model.decoder[-2].bias
    assert torch.sigmoid(bias).item() == pytest.approx(float(fives.mean()), rel=1e-5)
    torch.manual_seed(1)
    assert GradConDetector(create_model("gradcon_cae"), device="cpu").get_params()["output_init"] == "default"
    det.fit(fives, epochs=2, batch_size=64, seed=1)
    with torch.no_grad():
        spread = float(det.model(fives[:256]).std(0).mean())
    assert spread > 1e-3 and det.history_[-1]["recon"] < 0.09, (spread, det.history_)
    assert "prepare" in det.stream_problem and GradConDetector(create_model("gradcon_cae")).stream_problem is None
    with pytest.raises(ValueError, match="unknown output_init"):
        GradConDetector(create_model("gradcon_cae"), output_init="zeros")
    with pytest.raises(ValueError, match="needs a decoder ending in a biased convolution"):
        GradConDetector(create_model("arae_mlp"), output_init="mean")
