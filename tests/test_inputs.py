import numpy as np
import pytest
import torch

from gradcon_core import GradConDetector, create_model
from gradcon_core.data.arrays import as_image_batch


def test_uint8_and_float_layouts_are_accepted():
    gray = np.full((2, 28, 28), 255, dtype=np.uint8)
    assert torch.equal(as_image_batch(gray, 1, (28, 28)), torch.ones(2, 1, 28, 28))
    rgb = np.zeros((2, 28, 28, 3), dtype=np.uint8)
    rgb[..., 1] = 51
    batch = as_image_batch(rgb, 3, (28, 28))
    assert batch.shape == (2, 3, 28, 28) and float(batch[:, 1].mean()) == pytest.approx(0.2)
    assert as_image_batch(np.zeros((1, 1, 28, 28), np.float64), 1, (28, 28)).dtype == torch.float32


@pytest.mark.parametrize(
    ("x", "message"),
    [
        (np.zeros((0, 28, 28), np.uint8), "empty"),
        (np.zeros((28, 28), np.uint8), r"shape \[N,H,W\]"),
        (np.zeros((2, 28, 28), np.float32), r"shape \[N,C,H,W\]"),
        (np.full((2, 1, 28, 28), np.nan, np.float32), "NaN"),
        (np.full((2, 1, 28, 28), 2.0, np.float32), r"\[0, 1\]"),
        (np.zeros((2, 28, 28), np.int64), "dtype int64"),
        (np.zeros((2, 32, 32), np.uint8), "28x28"),
        (np.zeros((2, 28, 28, 3), np.uint8), "1-channel"),
        ([[0, 1]], "numpy array"),
    ],
)
def test_bad_input_raises_a_clear_value_error(x, message):
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    with pytest.raises(ValueError, match=message):
        det.decision_function(x)
    with pytest.raises(ValueError, match=message):
        det.fit(x, epochs=1)


def test_bad_hyperparameters_are_rejected():
    with pytest.raises(ValueError, match="alpha"):
        GradConDetector(create_model("gradcon_cae"), alpha=-1)
    with pytest.raises(ValueError, match="score_method"):
        GradConDetector(create_model("gradcon_cae"), score_method="slow")
    with pytest.raises(ValueError, match="epochs"):
        GradConDetector(create_model("gradcon_cae")).fit(np.zeros((2, 28, 28), np.uint8), epochs=0)


def test_predict_without_threshold_says_what_to_do():
    det = GradConDetector(create_model("gradcon_cae"), device="cpu")
    with pytest.raises(ValueError, match="set_threshold"):
        det.predict(np.zeros((2, 28, 28), np.uint8))
