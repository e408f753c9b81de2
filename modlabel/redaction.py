"""Passwords are never shown: not in messages, logs, the report or the ``scans`` table.

A database password can reach modlabel in four forms: a URL's user info
(``postgresql://user:pw@host/db``), a URL parameter (``?password=pw``), a libpq
connection string (``host=h password=pw``, see ``config.resolve_db_url``) and
``$PGPASSWORD``. ``safe_url`` renders a URL with every one of them masked, and
every text modlabel prints or stores goes through ``redact``, which masks each
password it has been shown (``remember``) wherever it appears, as a last guard
against a driver's message that quotes one.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable

MASK = "***"
# URL parameters and libpq keywords whose values are secrets.
SECRET_KEYS = frozenset({"password", "passwd", "pass", "pwd", "sslpassword", "secret", "token"})
# Shorter values are not masked inside other text (a password "a" would mask every "a").
MIN_SECRET_CHARS = 3

_known: set[str] = set()
_lock = threading.Lock()
# key=value pairs of libpq strings and URL queries, and a URL's user:password@.
_KEY_VALUE = re.compile(
    r"(?i)\b("
    + "|".join(sorted(SECRET_KEYS, key=len, reverse=True))
    + r")(\s*=\s*)('[^']*'|[^\s&;]+)"
)
_USER_INFO = re.compile(r"(://[^:/@\s]*:)([^@\s]*)(@)")


def remember(secrets: Iterable[str | None]) -> None:
    """Mask these values wherever ``redact`` sees them from now on."""
    with _lock:
        for secret in secrets:
            if secret and len(secret) >= MIN_SECRET_CHARS:
                _known.add(secret)


def remember_environment() -> None:
    """``$PGPASSWORD``, which libpq reads by itself."""
    remember([os.environ.get("PGPASSWORD")])


def remember_url(url: object) -> None:
    """The password and the secret parameters of a database URL."""
    try:
        import sqlalchemy as sa

        parsed = sa.engine.make_url(str(url)) if not hasattr(url, "password") else url
    except Exception:  # noqa: BLE001 - an unparsable URL: the patterns still mask it
        return
    values = [parsed.password]
    for key, value in parsed.query.items():
        if key.lower() in SECRET_KEYS:
            values.extend([value] if isinstance(value, str) else list(value))
    remember(str(v) for v in values if v is not None)


def redact(text: str) -> str:
    """``text`` with every known secret, URL password and ``password=...`` masked."""
    if not text:
        return text
    text = _USER_INFO.sub(lambda m: m.group(1) + MASK + m.group(3), text)
    text = _KEY_VALUE.sub(lambda m: m.group(1) + m.group(2) + MASK, text)
    with _lock:
        known = sorted(_known, key=len, reverse=True)
    for secret in known:
        text = text.replace(secret, MASK)
    return text


def safe_url(url: object) -> str:
    """A database URL for people: its password and secret parameters masked."""
    try:
        import sqlalchemy as sa

        parsed = sa.engine.make_url(str(url)) if not hasattr(url, "password") else url
        remember_url(parsed)
        query = {
            key: (MASK if key.lower() in SECRET_KEYS else value)
            for key, value in parsed.query.items()
        }
        rendered = parsed.set(query=query).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - whatever it is, nothing of it is shown
        return "<unparsable database URL>"
    return redact(rendered)
