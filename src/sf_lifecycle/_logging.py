"""Log output: text or JSON lines, secrets redacted, and never silently lost.

The library logs to `sf_lifecycle.*` loggers (README, "Logs", has the table) and otherwise leaves
logging to the application, with one exception: a server that configures only its own loggers
(plain `uvicorn`, gunicorn with uvicorn workers, hypercorn) leaves the root logger without a
handler, and Python then drops every record below WARNING, so the drain's timeline (draining
began, proxy saw 503, queue drained N records) would vanish. `Lifecycle.startup()` therefore
calls `ensure_logging`: when no handler would receive an `sf_lifecycle` record, it gives that
logger one (stderr, `SF_LOG_FORMAT`), and nothing otherwise. `configure_logging()` is the
explicit form, for the CLI and for apps that want the same output for all their loggers.

`JsonFormatter` writes one object per line: `time` (UTC, ISO 8601, ms), `level`, `logger`,
`message`, the record's extras (`logger.info(..., extra={...})`) and `exc` when there is a
traceback. Both formats pass the text through `redact_secrets` (URL credentials,
`password=` values): a sink's error may quote its DSN.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any, TextIO

from ._redact import redact_secrets

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "ensure_logging"]

LIBRARY_LOGGER = "sf_lifecycle"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Attributes every `LogRecord` has; anything else on a record is an extra worth writing.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


class TextFormatter(logging.Formatter):
    """The CLI's text format, with secrets redacted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, extras, exc."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": redact_secrets(record.getMessage()),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in out:
                out[key] = value
        if record.exc_info:
            out["exc"] = redact_secrets(self.formatException(record.exc_info))
        elif record.stack_info:
            out["stack"] = self.formatStack(record.stack_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def _formatter(fmt: str) -> logging.Formatter:
    if fmt not in ("text", "json"):
        raise ValueError(f"log format must be text or json, not {fmt!r}")
    return JsonFormatter() if fmt == "json" else TextFormatter()


def configure_logging(
    fmt: str = "text", level: int | str = "INFO", stream: TextIO | None = None
) -> logging.Handler:
    """Send every logger's records to `stream` (stderr) in `fmt` (`text` or `json`).

    Replaces the root logger's handlers (what `logging.basicConfig(force=True)` does) and sets
    its level; uvicorn's loggers propagate to it when uvicorn runs with `log_config=None`, as
    `sf-lifecycle serve` runs it. Returns the handler.
    """
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(_formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler


def ensure_logging(fmt: str = "text") -> logging.Handler | None:
    """Give the `sf_lifecycle` logger a stderr handler if none would receive its records.

    Returns the handler added, or None when the application's logging already covers it.
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    if logger.hasHandlers():
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.info("no logging handler configured for sf_lifecycle; logging to stderr (%s)", fmt)
    return handler
