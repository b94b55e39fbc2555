"""Logging set-up shared by both entry points: one line per event, time first."""

from __future__ import annotations

import logging
import re
from urllib.parse import urlsplit, urlunsplit

FORMAT = "%(asctime)s %(levelname)s %(name)s [%(process)d]: %(message)s"


#: Libraries whose debug lines carry request URLs with their query strings (presigned signatures).
_QUIET_BELOW_INFO = ("urllib3",)


def configure_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), format=FORMAT, force=True)
    for name in _QUIET_BELOW_INFO:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))


def redact_url(url: str) -> str:
    """``redis://:secret@host:6379/0`` -> ``redis://***@host:6379/0``, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None and parts.username is None:
        return url
    host = parts.hostname or ""
    netloc = f"***@{host}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


_URL = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/\s@'\"]*@)?(?P<rest>[^\s?#'\"]*)(?:[?#][^\s'\"]*)?")


def redact_urls(text: str) -> str:
    """Every URL in ``text`` without its userinfo and query string (presigned signatures, tokens)."""
    return _URL.sub(lambda m: m["scheme"] + m["rest"], text)
