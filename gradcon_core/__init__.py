"""gradcon_core: GradCon and friends in pure PyTorch + NumPy + PyArrow. Never imports Ray.

The folders follow the data: data/ (images -> image sets), models/ (networks), training/ (the loop, its
data-parallel plumbing, checkpoints), detectors/ (the contract, the registry, GradCon's objective and score,
every detector), results/ (result tables, evaluation, reports).
"""
from gradcon_core import detectors, models  # noqa: F401  (registers models and detectors)
from gradcon_core.detectors.contract import Detector, load_detector
from gradcon_core.detectors.gradcon import GradConDetector
from gradcon_core.detectors.registry import create_detector, list_detectors
from gradcon_core.metrics import evaluate
from gradcon_core.models.registry import create_model, list_models

__all__ = ["Detector", "GradConDetector", "create_detector", "create_model", "evaluate", "list_detectors",
           "list_models", "load_detector"]
