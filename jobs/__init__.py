"""Entry points: every `gradcon X` command is also `python -m jobs X`."""
