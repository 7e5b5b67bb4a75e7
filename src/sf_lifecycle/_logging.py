"""Log output: text or JSON lines, secrets redacted, and never silently lost.

The library logs to `sf_lifecycle.*` loggers (README, "Logs", has the table) and otherwise leaves
logging to the application, with one exception: a server that configures only its own loggers
(plain `uvicorn`, gunicorn with uvicorn workers, hypercorn) leaves the root logger without a
handler, and Python then drops every record below WARNING, so the drain's timeline (draining
began, proxy saw 503, queue drained N records) would vanish. `Lifecycle.startup()` therefore
calls `ensure_logging`: when no handler would receive an `sf_lifecycle` record, it gives that
logger one (stderr, `SF_LOG_FORMAT`), and nothing otherwise. `configure_logging()` is the
explicit form, for the CLI and for apps that want the same output for all their loggers.

An application that calls `logging.config.dictConfig` after importing the library (with
`disable_existing_loggers` left at its default, True) disables every `sf_lifecycle.*` logger
that already exists, silently; `ensure_logging` turns them back on and says so once.

`JsonFormatter` writes one object per line, always valid JSON: `time` (UTC, ISO 8601, ms),
`level`, `logger`, `message`, the record's extras (`logger.info(..., extra={...})`) and `exc`
when there is a traceback. An extra that JSON cannot hold (NaN, a dict with tuple keys, a
cycle, an object whose `str()` raises) is written as text rather than losing the record;
uvicorn's `color_message` (the message again, with ANSI colours) is left out. Both formats pass
the text, and the JSON format every extra, through `redact_secrets` (URL credentials,
`password=`/`token=`-style values), and an extra named like a secret (`password`, `token`,
`authorization`, ...) is replaced whole: a sink's error may quote its DSN.
"""

from __future__ import annotations

import json
import logging
import math
import re
import sys
import time
from typing import Any, TextIO

from ._redact import redact_secrets

__all__ = ["JsonFormatter", "TextFormatter", "configure_logging", "ensure_logging"]

LIBRARY_LOGGER = "sf_lifecycle"
TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
#: Attributes every `LogRecord` has; anything else on a record is an extra worth writing.
#: uvicorn's `color_message` repeats the message with ANSI colour codes: not for a log pipeline.
_STANDARD = frozenset(vars(logging.makeLogRecord({}))) | {
    "message",
    "asctime",
    "taskName",
    "color_message",
}
#: Extras whose whole value is a secret, whatever it looks like.
_SECRET_KEY = re.compile(
    r"(?i)(?:^|[_.-])(pass(word|wd)?|pwd|secret|token|api[_-]?key|authorization|credentials?|cookie)$"
)
#: How deep `_jsonable` follows nested extras before writing the rest as text.
_MAX_DEPTH = 8


class TextFormatter(logging.Formatter):
    """The CLI's text format, with secrets redacted."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        return redact_secrets(super().format(record))


def _text(value: object) -> str:
    try:
        return redact_secrets(str(value))
    except Exception:  # a broken __str__ must not lose the record
        return f"<unprintable {type(value).__name__}>"


def _jsonable(value: object, depth: int = 0, seen: frozenset[int] = frozenset()) -> Any:
    """`value` as JSON can hold it, strings redacted: non-finite floats, odd keys, cycles and
    unknown objects become text, so `json.dumps(..., allow_nan=False)` cannot fail."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return redact_secrets(value)
    if isinstance(value, (dict, list, tuple, set, frozenset)):
        if id(value) in seen:
            return "<circular>"
        if depth >= _MAX_DEPTH:
            return _text(value)
        inner = seen | {id(value)}
        if isinstance(value, dict):
            return {
                _text(k): "<redacted>"
                if isinstance(k, str) and _SECRET_KEY.search(k)
                else _jsonable(v, depth + 1, inner)
                for k, v in value.items()
            }
        return [_jsonable(v, depth + 1, inner) for v in value]
    return _text(value)


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
                out[key] = "<redacted>" if _SECRET_KEY.search(key) else _jsonable(value)
        if record.exc_info:
            out["exc"] = redact_secrets(self.formatException(record.exc_info))
        elif record.stack_info:
            out["stack"] = redact_secrets(self.formatStack(record.stack_info))
        return json.dumps(out, ensure_ascii=False, allow_nan=False)


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


def _enable_library_loggers() -> None:
    """Turn back on the `sf_lifecycle` loggers a `dictConfig` disabled, and say so once.

    `disable_existing_loggers=True` (dictConfig's default) is almost never meant for a
    library's drain timeline; an app that wants it quiet raises its level instead (README,
    "Logging").
    """
    disabled = [
        lg
        for name, lg in logging.Logger.manager.loggerDict.items()
        if (name == LIBRARY_LOGGER or name.startswith(LIBRARY_LOGGER + "."))
        and isinstance(lg, logging.Logger)
        and lg.disabled
    ]
    if not disabled:
        return
    for lg in disabled:
        lg.disabled = False
    logging.getLogger(LIBRARY_LOGGER).warning(
        "%d sf_lifecycle logger(s) were disabled by logging.config.dictConfig "
        "(disable_existing_loggers=True) and are enabled again; name `sf_lifecycle` in the "
        "config or set disable_existing_loggers=False to keep this line away",
        len(disabled),
    )


def ensure_logging(fmt: str = "text") -> logging.Handler | None:
    """Give the `sf_lifecycle` logger a stderr handler if none would receive its records.

    Also re-enables `sf_lifecycle` loggers that a `dictConfig` disabled (with one warning).
    Returns the handler added, or None when the application's logging already covers it.
    """
    logger = logging.getLogger(LIBRARY_LOGGER)
    _enable_library_loggers()
    if logger.hasHandlers():
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    logger.addHandler(handler)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    logger.info("no logging handler configured for sf_lifecycle; logging to stderr (%s)", fmt)
    return handler
