"""Detectors. Importing this package registers every detector with the registry."""
from gradcon_core.detectors import aae, cae, dae, deep_svdd, gradcon, puzzle_ae, shallow, vae, wae  # noqa: F401
