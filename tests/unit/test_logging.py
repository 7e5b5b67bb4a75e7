"""Log output: one valid JSON object per line whatever the extras, secrets redacted, and the
library's lines not lost to an application's `dictConfig`."""

from __future__ import annotations

import io
import json
import logging
import logging.config
import math
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sf_lifecycle._logging import JsonFormatter, TextFormatter, ensure_logging


@pytest.fixture
def emit() -> Iterator[Any]:
    logger = logging.getLogger("sf_lifecycle.test_logging")
    saved = (logger.handlers[:], logger.propagate, logger.level)

    def emit(fmt: logging.Formatter, msg: str, *args: object, **kwargs: Any) -> str:
        buf = io.StringIO()
        handler = logging.StreamHandler(buf)
        handler.setFormatter(fmt)
        logger.handlers[:] = [handler]
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.error(msg, *args, **kwargs)
        return buf.getvalue()

    yield emit
    logger.handlers[:], logger.propagate, logger.level = saved


def _strict(line: str) -> dict[str, Any]:
    """Parse as a JSON pipeline would: NaN and Infinity are not JSON."""

    def refuse(constant: str) -> None:
        raise ValueError(f"not JSON: {constant}")

    obj = json.loads(line, parse_constant=refuse)
    assert isinstance(obj, dict)
    return obj


def _circular() -> dict[str, Any]:
    d: dict[str, Any] = {}
    d["self"] = d
    return d


class _BrokenStr:
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    ("extra", "key", "written"),
    [
        ({"ratio": math.nan}, "ratio", "nan"),
        ({"ratio": math.inf}, "ratio", "inf"),
        ({"m": {(1, 2): 3}}, "m", {"(1, 2)": 3}),
        ({"d": _circular()}, "d", {"self": "<circular>"}),
        ({"o": _BrokenStr()}, "o", "<unprintable _BrokenStr>"),
        ({"s": {3}}, "s", [3]),
    ],
)
def test_json_lines_stay_one_valid_object_whatever_the_extras(
    emit: Any, capsys: pytest.CaptureFixture[str], extra: dict[str, Any], key: str, written: Any
) -> None:
    out = emit(JsonFormatter(), "x", extra=extra)
    lines = out.splitlines()
    assert len(lines) == 1
    assert _strict(lines[0])[key] == written
    assert capsys.readouterr().err == ""  # no "--- Logging error ---" traceback


def test_json_extras_are_redacted(emit: Any) -> None:
    out = _strict(
        emit(
            JsonFormatter(),
            "db",
            extra={
                "dsn": "postgres://u:SECRET7@h/db",
                "password": "SECRET8",
                "client_secret": 12345,
                "nested": {"api_key": "SECRET9", "url": "redis://:SECRET10@r:6379/0"},
            },
        )
    )
    text = json.dumps(out)
    for secret in ("SECRET7", "SECRET8", "12345", "SECRET9", "SECRET10"):
        assert secret not in text
    assert out["dsn"] == "postgres://<redacted>@h/db"
    assert out["password"] == out["client_secret"] == "<redacted>"
    assert out["nested"] == {"api_key": "<redacted>", "url": "redis://<redacted>@r:6379/0"}


def test_uvicorns_color_message_is_not_written(emit: Any) -> None:
    out = _strict(
        emit(JsonFormatter(), "Started", extra={"color_message": "\x1b[32mStarted\x1b[0m"})
    )
    assert "color_message" not in out
    assert out["message"] == "Started"


def test_text_format_redacts_the_message(emit: Any) -> None:
    out = emit(TextFormatter(), "sink failed: %s", "postgres://app:hunter2@db/x")
    assert "hunter2" not in out
    assert "postgres://<redacted>@db/x" in out


def test_loggers_a_dictconfig_disabled_are_enabled_again_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logging.getLogger("sf_lifecycle.lifecycle")  # exists before the app configures logging
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    # dictConfig disables every existing logger: put the other tests' loggers back after.
    others = [
        lg
        for lg in logging.Logger.manager.loggerDict.values()
        if isinstance(lg, logging.Logger) and not lg.disabled
    ]
    try:
        logging.config.dictConfig(
            {
                "version": 1,
                "handlers": {"h": {"class": "logging.StreamHandler", "stream": io.StringIO()}},
                "root": {"handlers": ["h"], "level": "INFO"},
            }
        )
        assert logging.getLogger("sf_lifecycle.lifecycle").disabled
        root.addHandler(caplog.handler)
        assert ensure_logging() is None  # the root has a handler: nothing added
        assert not logging.getLogger("sf_lifecycle.lifecycle").disabled
        assert not logging.getLogger("sf_lifecycle").disabled
        logging.getLogger("sf_lifecycle.lifecycle").info("ready after 1 ms")
        ensure_logging()  # once: nothing left to enable, nothing said
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        for lg in others:
            lg.disabled = False
    messages = [r.getMessage() for r in caplog.records]
    warned = [m for m in messages if "disabled by logging.config.dictConfig" in m]
    assert len(warned) == 1
    assert "disable_existing_loggers=False" in warned[0]
    assert "ready after 1 ms" in messages


_SECRET_VALUE = st.text(
    alphabet="ABCDEFGHJKMNPQRSTUVWXYZabcdefghjkmnpqrstuvwxyz23456789+/_-", min_size=4, max_size=24
)
_SPELLINGS = [
    "GET /api/x?access_token={s} HTTP/1.1",
    "GET /api/x?a=1&token={s}&b=2",
    "client_secret={s}",
    "host=db password={s} user=app",
    "DB_PASSWORD={s}",
    "PASSWORD = {s}",
    "password: {s}",
    "connect failed: password '{s}'",
    "{{'password': '{s}', 'user': 'app'}}",
    '{{"api_key": "{s}"}}',
    "Authorization: Bearer {s}",
    "headers={{'authorization': 'Basic {s}'}}",
    "proxy-authorization: {s}",
]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(spelling=st.sampled_from(_SPELLINGS), secret=_SECRET_VALUE)
def test_no_formatter_writes_a_secret_in_a_common_spelling(
    emit: Any, spelling: str, secret: str
) -> None:
    secret = "Zq9" + secret  # never a substring of the spelling's own words
    for fmt in (TextFormatter(), JsonFormatter()):
        out = emit(fmt, "sink failed: %s", spelling.format(s=secret))
        assert secret not in out, out
        assert "<redacted>" in out
    line = emit(JsonFormatter(), "x", extra={"detail": spelling.format(s=secret)})
    assert secret not in line


@pytest.mark.parametrize(
    "prose", ["password incorrect for user app", "max_tokens=5", "secretary=bob", "token expired"]
)
def test_prose_and_look_alike_names_are_left_alone(emit: Any, prose: str) -> None:
    assert prose in emit(TextFormatter(), "%s", prose)
