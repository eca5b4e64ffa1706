"""gradcon_core: GradCon and friends in pure PyTorch + NumPy. Never imports Ray."""
from gradcon_core import detectors, models  # noqa: F401  (registers models and detectors)
from gradcon_core.detector import Detector, load_detector
from gradcon_core.detectors.gradcon import GradConDetector
from gradcon_core.metrics import evaluate
from gradcon_core.registry import create_model, list_detectors, list_models

__all__ = ["Detector", "GradConDetector", "create_model", "evaluate", "list_detectors", "list_models",
           "load_detector"]
