"""Secrets kept out of what we print: which variable names look secret, their values, and redaction."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable

SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|CREDENTIAL|PRIVATE|(^|_)KEY($|_)", re.IGNORECASE)
MIN_SECRET_LENGTH = 6  # shorter values would redact ordinary words


def is_secret_name(name: str) -> bool:
    """AWS_SECRET_ACCESS_KEY, AWS_ACCESS_KEY_ID, RAY_AUTH_TOKEN, DB_PASSWORD, ... but not AWS_ENDPOINT_URL."""
    return bool(SECRET_NAME.search(name))


def secret_values(names: Iterable[str] = ()) -> list[str]:
    """Values that must never be printed: every secret-looking variable in this environment, and these names'."""
    names = {n for n in os.environ if is_secret_name(n)} | set(names)
    values = {os.environ[n] for n in names if n in os.environ and len(os.environ[n]) >= MIN_SECRET_LENGTH}
    return sorted(values, key=len, reverse=True)  # longest first: a secret containing another is replaced whole


def redact(text: str, secrets: Iterable[str]) -> str:
    for value in secrets:
        text = text.replace(value, "***")
    return text
