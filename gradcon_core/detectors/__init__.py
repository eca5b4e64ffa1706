"""Detectors. Importing this package registers every detector with the registry."""
from gradcon_core.detectors import gradcon  # noqa: F401
