"""Error text for probe bodies: no secrets, no paths.

`/api/ready` explains why a replica is not ready, and anything an HTTP client can read must
carry neither credentials nor file system paths (RELIABILITY.md, threat model). Errors come from
code we do not control (a sink, a readiness check, a driver), so their messages are redacted
conservatively rather than trusted.
"""

from __future__ import annotations

import re

__all__ = ["describe_error", "redact_secrets", "redact_url"]

#: A URL: scheme, optional userinfo (credentials), host, and the rest (path, query). The
#: userinfo runs to the last `@` of the line, as `urlsplit` takes the last `@`, and further: a
#: password may hold a raw `@`, `/`, `#`, `?`, a quote or a space that its owner did not
#: percent-encode (libpq takes them). What lies between is lost too: redaction errs that way.
_URL = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*)://(?:[^\r\n]*@)?([^\s/?#'\"]*)(\S*)")
#: A `file:` URL without `//`, or a quoted string holding a path separator.
_FILE_URL = re.compile(r"(?i)\bfile:\S*")
_QUOTED_PATH = re.compile(r"'[^']*[/\\][^']*'|\"[^\"]*[/\\][^\"]*\"")
#: An unquoted path: absolute, home, `./`/`../`, Windows, or relative with a separator. It runs
#: to the end of its clause, spaces included: a path may hold spaces, and what follows it in
#: the same clause is not worth the risk.
_PATH = re.compile(
    r"(?:(?<![\w<>])~?/|(?<![\w<>])\.{1,2}/|\b[A-Za-z]:\\|(?<![<\w])[\w.-]+[/\\])[^:;,'\"]*"
)


def redact_url(url: str) -> str:
    """`url` with its credentials replaced, for logs and error messages.

    Host, port and path stay (an operator needs them to see which server is meant); the
    password, and the user name with it, never appear: everything before the last `@` goes,
    whatever characters the password holds (a raw `@`, `/`, `#`, `?`, a space), and with or
    without a scheme.
    """
    url = url.strip()
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    if "@" in rest:
        rest = "<redacted>@" + rest.rpartition("@")[2]
    return redact_secrets(scheme + sep + rest)


def _redact_url(m: re.Match[str]) -> str:
    scheme, host, rest = m.group(1), m.group(2), m.group(3)
    if scheme.lower() == "file":
        return "<path>"
    return f"{scheme}://{host}" + ("/<path>" if rest else "")


#: A name that says its value is secret, alone or at the end of a longer one (`access_token`,
#: `client_secret`, `DB_PASSWORD`): `\b` would miss them, `_` being a word character.
_SECRET_NAME = r"[\w.-]*?(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key)"
#: `password=...`-style secrets outside URLs: a DSN in libpq's key=value form, a query string
#: (`?access_token=...`), `PASSWORD = x`, `password: x`, a dict's repr (`{'password': 'x'}`,
#: JSON), and a quoted value after the bare name (`password 'x'`). An unquoted value after a
#: space is prose (`password incorrect`) and stays.
_SECRET = re.compile(
    rf"""(?ix)(?<![\w])
    (['"]?{_SECRET_NAME}['"]?)
    (?: (\s*[=:]\s*) (?: '[^']*' | "[^"]*" | [^\s,;&'"}}\]]+ )
      | (\s+) (?: '[^']*' | "[^"]*" ) )"""
)
#: An HTTP `Authorization` header (or its repr): the scheme stays, the credentials go.
_AUTHORIZATION = re.compile(
    r"""(?i)\b((?:proxy-)?authorization['"]?\s*[:=]\s*['"]?)"""
    r"""(?:(bearer|basic|digest|token|negotiate)\s+)?[^\s,;'"]+"""
)


def _redact_secret(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2] if m[2] is not None else m[3]}<redacted>"


def _redact_authorization(m: re.Match[str]) -> str:
    return f"{m[1]}{m[2] + ' ' if m[2] else ''}<redacted>"


def _redact_values(text: str) -> str:
    """Values of secret-named keys and `Authorization` credentials replaced."""
    return _SECRET.sub(_redact_secret, _AUTHORIZATION.sub(_redact_authorization, text))


def _redact_paths(text: str) -> str:
    text = _redact_values(text)
    text = _FILE_URL.sub("<path>", text)
    text = _QUOTED_PATH.sub("'<path>'", text)
    return _PATH.sub("<path>", text)


#: The userinfo of a URL (`user:password@`), which log lines must never carry: from
#: `scheme://` to the last `@` of the line, whatever lies between (a password may hold a raw
#: `@`, `/`, `#`, `?`, a quote or a space).
_USERINFO = re.compile(r"(?i)\b([a-z][a-z0-9+.-]*://)[^\r\n]*@")


def redact_secrets(text: str) -> str:
    """`text` without credentials: URL userinfo, `password=`-style values (also `access_token=`,
    `PASSWORD = x`, `{'password': 'x'}`, `password 'x'`) and `Authorization` credentials
    replaced.

    For log lines (`_logging`), which may name paths (an operator needs them) but never a
    secret: a sink's DSN in an error message, a token in a URL.
    """
    return _redact_values(_USERINFO.sub(r"\1<redacted>@", text))


def describe_error(exc: BaseException) -> str:
    """`Type: message` for a probe body, without secrets or paths.

    The threat model keeps paths and credentials out of anything an HTTP client can read. An
    `OSError` gives its `strerror` (never its file name), a database error its class and
    SQLSTATE (never the server's text, which can quote a record); any other message has URL
    credentials and paths replaced (`<path>`), conservatively: a path runs to the end of its
    clause.
    """
    sqlstate = getattr(exc, "sqlstate", None)
    if isinstance(sqlstate, str) and hasattr(exc, "diag"):
        # A database error (psycopg): the server's message, DETAIL and CONTEXT can quote the
        # record being stored, so only the class and the SQLSTATE leave.
        return f"{type(exc).__name__} (SQLSTATE {sqlstate})"
    if isinstance(exc, OSError) and exc.strerror:
        text = str(exc.strerror)
    else:
        raw, parts, last = str(exc), [], 0
        for m in _URL.finditer(raw):  # URLs apart, so their `//` is not taken for a path
            parts += [_redact_paths(raw[last : m.start()]), _redact_url(m)]
            last = m.end()
        parts.append(_redact_paths(raw[last:]))
        text = "".join(parts).strip()
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


def quotes_server_text(exc: BaseException) -> bool:
    """Whether `exc` or an exception it chains is a database error, whose text (message,
    DETAIL, CONTEXT) can quote a record: a traceback of it must not reach the log."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(getattr(e, "sqlstate", None), str) and hasattr(e, "diag"):
            return True
        stack += [e.__cause__, e.__context__]
    return False
