"""Credentials never leave through a redacted URL, log line, probe body or config error,
whatever characters the password holds (issue 13)."""

from __future__ import annotations

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from sf_lifecycle import ConfigError
from sf_lifecycle._events_redis import check_redis_url
from sf_lifecycle._redact import describe_error, redact_secrets, redact_url

#: What a password in a URL may hold unencoded and still be taken by redis-py or psycopg
#: (`urlsplit` splits the userinfo at the last `@`): any printable ASCII but a space.
_PASSWORDS = st.text(st.characters(min_codepoint=33, max_codepoint=126), min_size=6, max_size=24)


def _config_error(url: str) -> str:
    """The line `serve` prints for `SF_REDIS_URL=url` ("" if the URL is accepted)."""
    try:
        check_redis_url(url)
    except ConfigError as exc:
        return str(exc)
    return ""


@st.composite
def _urls(draw: st.DrawFn) -> tuple[str, str, str]:
    password = draw(_PASSWORDS)
    scheme = draw(st.sampled_from(["redis", "rediss", "postgresql", "postgres"]))
    user = draw(st.sampled_from(["", "app", "default"]))
    host = draw(st.sampled_from(["127.0.0.1", "redis", "db.internal", "[::1]"]))
    port = draw(st.sampled_from(["", ":6379", ":5432"]))
    path = draw(st.sampled_from(["", "/", "/0", "/app"]))
    query = draw(st.sampled_from(["", "?sslmode=require", "?socket_timeout=2"]))
    url = f"{scheme}://{user}:{password}@{host}{port}{path}{query}"
    rest = f"{scheme}://<redacted>@<path>{host}{port}{path}{query}"
    return url, password, rest


@settings(max_examples=400, deadline=None)
@given(_urls())
def test_a_random_password_never_shows_in_any_redacted_form(case: tuple[str, str, str]) -> None:
    url, password, rest = case
    assume(password not in rest + " RuntimeError: connecting to failed: refused invalid url=")
    shown = redact_url(url)
    assert password not in shown
    assert url.rpartition("@")[2].split(":")[0].split("/")[0] in shown  # the host stays
    assert password not in redact_secrets(f"connecting to {url} failed")
    assert password not in redact_secrets(f"url={url}")
    assert password not in describe_error(RuntimeError(f"connecting to {url}: refused"))
    assert password not in describe_error(RuntimeError(f"'{url}'"))
    assert password not in _config_error(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user:hunter@2secret@127.0.0.1:1/0",
        "redis://:top/2secret@redis:6379/0",
        "redis://:top#2secret@redis:6379/0",
        "redis://:top?2secret@redis:6379/0",
        "redis:2secret@redis",
    ],
)
def test_a_password_with_a_raw_at_slash_hash_or_question_mark_does_not_leak(url: str) -> None:
    assert "2secret" not in redact_url(url)
    assert "2secret" not in _config_error(url)
    if "://" in url:
        assert "2secret" not in redact_secrets(f"Redis at {url} unavailable")
        assert "2secret" not in describe_error(RuntimeError(f"Redis at {url} unavailable"))


#: Any printable character at all, a space and quotes included (libpq takes such a URL).
_ANY_PASSWORDS = st.text(
    st.characters(blacklist_categories=("Cc", "Cs", "Zl", "Zp")), min_size=0, max_size=24
)


@settings(max_examples=400, deadline=None)
@given(_ANY_PASSWORDS, _ANY_PASSWORDS, st.sampled_from(["postgresql", "postgres", "redis"]))
def test_a_password_of_any_printable_characters_never_shows(
    left: str, right: str, scheme: str
) -> None:
    """The userinfo goes from `scheme://` to the last `@` before the host, whatever it holds:
    in `redact_url`, in a log line (`redact_secrets`: the start-up settings line quotes the
    URL) and in a probe body (`describe_error`)."""
    marker = "XYZZY1"
    url = f"{scheme}://postgres:{left}{marker}{right}@127.0.0.1:5432/db"
    shown = redact_url(url)
    assert marker not in shown
    assert "127.0.0.1:5432" in shown
    for line in (
        f"settings: database_url={url!r} port=4000",
        f'settings: database_url="{url}" port=4000',
        f"connecting to {url} failed",
    ):
        assert marker not in redact_secrets(line), line
        assert marker not in describe_error(RuntimeError(line)), line


def test_a_postgres_error_in_a_probe_body_is_its_class_and_sqlstate_only() -> None:
    """PostgreSQL's message, DETAIL and CONTEXT can quote the record (`JSON data, line 1:
    {"bad":...`): a probe body carries the error class and SQLSTATE, nothing the server
    said."""
    import psycopg

    exc = psycopg.errors.UntranslatableCharacter(
        "unsupported Unicode escape sequence\nDETAIL: \\u0000 cannot be converted to text.\n"
        'CONTEXT: JSON data, line 1: {"card":"4111-1111..."'
    )
    assert describe_error(exc) == "UntranslatableCharacter (SQLSTATE 22P05)"
