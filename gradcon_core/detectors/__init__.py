"""Detectors. Importing this package registers every detector with the registry."""
from gradcon_core.detectors import cae, dae, gradcon  # noqa: F401
