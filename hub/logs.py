"""Keep hub tokens out of logs: uvicorn logs a WebSocket's path and query at
info level (``?token=...``) and, at debug level, ``websockets`` logs request
headers (``Authorization: Bearer ...``) on both ends."""

from __future__ import annotations

import logging
import re

_SECRETS = re.compile(
    r"(?i)(token=|authorization:\s*bearer\s+|authorization',\s*'bearer\s+)[^&\s\"',]+"
)

SERVER_LOGGERS = ("uvicorn", "uvicorn.error", "uvicorn.access", "websockets", "websockets.server")
CLIENT_LOGGERS = ("websockets", "websockets.client")


def redact(text: str) -> str:
    """``text`` with any hub token replaced by ``***``."""
    return _SECRETS.sub(r"\1***", text)


class RedactTokens(logging.Filter):
    """A logging filter that masks hub tokens in a record's message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        masked = redact(message)
        if masked != message:
            record.msg, record.args = masked, ()
        return True


_FILTER = RedactTokens()


def protect(names: tuple[str, ...]) -> None:
    """Add the filter to these loggers (once each)."""
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
