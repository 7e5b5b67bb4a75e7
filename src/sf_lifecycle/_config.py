"""Every setting in one frozen dataclass, and the one rule that says where a value comes from.

Precedence, highest first (README, "Configuration"):

1. command-line flags of `sf-lifecycle serve` (`--port`): the operator who runs the process has
   the last word;
2. explicit arguments in code (`Settings(replica_id="a")`, `from_env(port=...)`): code that pins
   a value on purpose beats the environment;
3. `SF_*` environment variables;
4. the defaults below.

One rule, wherever the process runs (plain `uvicorn app:app`, gunicorn, `serve`, a test):
`Settings(...)` takes the fields given, fills every other field from its `SF_*` variable in
`os.environ` (`from_env(environ=...)` reads that mapping instead, and only it), and the command
line of `sf-lifecycle serve`, while it runs (`command_line()`), wins over all of them. So an
app that pins `Settings(replica_id="a")` still gets `SF_DRAIN_DELAY_MS` under any server, and
`--port` still beats the port it pinned. Why this order: the operator who starts the process
knows the machine, code that pins a value does so on purpose, and the environment is the
deployment's default for everything else. `dataclasses.replace()` keeps the source of every
field it does not change. Each instance records where each value came from (`sources()`), and
an error names that source: the flag, the variable or the argument. A bad value raises
`ConfigError` at start-up, naming its source, the value and what is allowed: a typo must not
surface as a dropped write ten minutes into an upgrade. Fields are keyword-only.

Durations (`*_ms`) take an integer number of milliseconds or a value with a unit, `500ms`,
`5s`, `2m`: the same in every `SF_*_MS` variable, every `--*-ms` flag and in code
(`Settings(grace_ms="30s")`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import functools
import importlib.metadata
import ipaddress
import os
import re
import secrets
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ._errors import ConfigError, UnsafePath
from ._redact import redact_url
from ._statefiles import open_state_dir

__all__ = [
    "ENV_VARS",
    "FileMode",
    "Settings",
    "command_line",
    "package_version",
    "parse_ms",
    "unknown_variables",
]

_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


class FileMode(int):
    """A permission mode: an int that prints in octal (`0600`), as operators write it."""

    def __str__(self) -> str:
        return f"0{self:o}"

    __repr__ = __str__


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """The library's settings. Units are in the names (`_ms`, `_bytes`).

    Attributes:
        grace_ms: Budget for the whole shutdown, counted from SIGTERM: drain delay, in-flight
            requests and shutdown hooks (the feedback-queue drain). Must be longer than
            `drain_delay_ms`. The orchestrator's kill timeout (`stop_grace_period`,
            `terminationGracePeriodSeconds`) must be at least this plus 10 s (`check-infra`).
        drain_delay_ms: How long the replica keeps serving after SIGTERM while answering 503 on
            its health check, so the proxy notices and stops routing to it.
        drain_after_probes: End the drain delay early, `drain_margin_ms` after this many health
            probes were answered 503 (right for Traefik). `None` always waits the full delay.
        drain_margin_ms: Slack after the N-th 503 probe for the proxy to apply its new pool.
        state_dir: Directory of the durable queue and session event logs (a volume that
            survives the container).
        version: Reported by `/api/version`; defaults to the package version.
        git_sha: Commit reported by `/api/version`.
        replica_id: Identifies this replica in `X-SF-Replica` and `/api/version`.
        host: Interface the runner binds.
        port: TCP port the runner binds.
        drain_interval_ms: Period of the background drainer that moves queued writes to the sink.
        drain_batch_records: Records handed to the sink per call.
        orphan_sweep_ms: Period of the sweep that recovers segments of peers that died after this
            replica started (start-up recovery covers the ones already dead).
        feedback_max_bytes: Largest accepted feedback body; enforced while reading.
        sse_max_streams: Open SSE streams per process; more are answered 503 with Retry-After.
        sse_ping_ms: Keep-alive comment period on idle SSE streams.
        sse_retry_ms: `retry:` hint sent to clients when a stream is closed for shutdown.
        sse_retention_events: Events kept per session for `Last-Event-ID` resume.
        sse_retention_ms: Age after which session events may be discarded.
        sse_watch: How the file event log sees other processes' appends: `auto` (inotify where
            available, else polling), `inotify` (refuse to start without it) or `poll`.
        file_mode: Permissions of files the library creates in the state directory (octal in
            `SF_FILE_MODE`; the umask still applies). Owner read and write are required.
        dir_mode: Permissions of directories it creates there (octal; owner rwx required).
        redis_url: Redis for session events shared across hosts (`RedisEventLog`; the
            `redis` extra): `redis://[:password@]host[:port][/db]`, `rediss://` or `unix://`.
            Left out of `repr()`, and shown without its password in errors and logs.
        health_prefix: Prefix of the health paths (`<prefix>/healthz`, `/ready`, `/livez`,
            `/version`); `/` (or `""` in code) serves them at the root. An empty
            `SF_HEALTH_PREFIX` is unset, as every empty `SF_*` variable: the default `/api`.
            No `.` or `..` segment (clients normalise them away). Point the proxy's and
            orchestrator's probes at it.
        metrics_path: Serve Prometheus metrics on this path of the app's port (needs the
            `metrics` extra); None (the default) serves none. Answered by the middleware
            before the app's router, so it shadows an app route of the same path; a health
            path is refused.
        metrics_port: Serve Prometheus metrics on this port, in a thread of its own, on
            `host` (also while the listeners are closed and the hooks run); None: no port.
            Must differ from `port`. A port already bound (a sibling gunicorn worker) is
            logged once and skipped; `sf-lifecycle serve` refuses it at start instead.
        log_format: `text` or `json` (one object per line) for `sf-lifecycle serve` and
            `configure_logging()`.
        access_log: Log every request (uvicorn's access log) under `sf-lifecycle serve`.
        liveness_stall_ms: `/api/livez` answers 503 when the event loop stalled longer than
            this (now, or within the last such period): the process is wedged.
        database_url: `postgresql://...`: PostgreSQL holds the drained feedback, the
            idempotency index and the session events (the `[postgres]` extra), shared by
            replicas on many hosts; the state directory then holds only this replica's
            write-ahead queue. A secret: never in `repr`, logs or probe bodies.
        database_table: The PostgreSQL table the example server's sink stores delivered
            feedback in (a plain SQL identifier; created when missing).
    """

    grace_ms: int = 600_000
    drain_delay_ms: int = 5_000
    drain_after_probes: int | None = None
    drain_margin_ms: int = 500
    state_dir: Path | None = None
    version: str | None = None
    git_sha: str | None = None
    replica_id: str | None = None
    host: str = "127.0.0.1"
    port: int = 4000
    drain_interval_ms: int = 200
    drain_batch_records: int = 1_000
    orphan_sweep_ms: int = 30_000
    feedback_max_bytes: int = 65_536
    sse_max_streams: int = 1_000
    sse_ping_ms: int = 15_000
    sse_retry_ms: int = 1_000
    sse_retention_events: int = 10_000
    sse_retention_ms: int = 3_600_000
    sse_watch: str = "auto"
    file_mode: int = FileMode(0o600)
    dir_mode: int = FileMode(0o700)
    redis_url: str | None = field(default=None, repr=False)
    health_prefix: str = "/api"
    metrics_path: str | None = None
    metrics_port: int | None = None
    log_format: str = "text"
    access_log: bool = False
    liveness_stall_ms: int = 10_000
    database_url: str | None = field(default=None, repr=False)
    database_table: str = "sf_feedback"
    _sources: Mapping[str, str] = field(default_factory=dict, repr=False, compare=False)

    def __post_init__(self) -> None:
        for name in _MODE_FIELDS:  # a plain int given in code prints as octal too
            value = getattr(self, name)
            if type(value) is int:
                object.__setattr__(self, name, FileMode(value))
        if self.health_prefix == "/":  # the root, as `SF_HEALTH_PREFIX=/` says it
            object.__setattr__(self, "health_prefix", "")
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            _validate(f.name, getattr(self, f.name), self._sources.get(f.name, f.name))
        self._check_metrics()
        if self.drain_margin_ms > self.drain_delay_ms and self.drain_after_probes is not None:
            raise ConfigError(
                self._sources.get("drain_margin_ms", "drain_margin_ms"),
                self.drain_margin_ms,
                f"must not exceed the drain delay ({self.drain_delay_ms} ms)",
            )
        if self.drain_delay_ms >= self.grace_ms:
            # The one rule (README, "Shutdown"): the budget counts from the signal and includes
            # the drain delay; a delay that fills it leaves nothing for in-flight requests and
            # the final queue drain, and every shutdown would end with exit 4.
            # Name the setting the operator changed: with only the budget lowered, blaming the
            # drain delay's default sends them to the wrong variable.
            # Settings read from the environment name variables, explicit arguments fields.
            named = (
                ENV_VARS
                if any(v.startswith(("SF_", "-")) for v in self._sources.values())
                else {f: f for f in ENV_VARS}
            )
            if _overlay:  # under `serve`: name the flag that changes it
                named = {**named, **_overlay[-1].names}
            grace = self._sources.get("grace_ms", named["grace_ms"])
            delay = self._sources.get("drain_delay_ms", named["drain_delay_ms"])
            fix = f"raise {grace} or lower {delay}"
            if "drain_delay_ms" in self._sources or "grace_ms" not in self._sources:
                raise ConfigError(
                    delay,
                    self.drain_delay_ms,
                    f"must be shorter than the grace budget ({grace}={self.grace_ms}), which "
                    f"counts from the signal and must leave time for the final drain; {fix}",
                )
            raise ConfigError(
                grace,
                self.grace_ms,
                f"the grace budget must be longer than the drain delay "
                f"({delay}={self.drain_delay_ms}, the default); {fix}",
            )

    def _check_metrics(self) -> None:
        """The metrics path must not replace a health path (the middleware answers one path
        with one handler: `SF_METRICS_PATH=<prefix>/healthz` would answer 200 while
        draining), and the metrics port must not be the app's port (one of the two binds
        would fail, after a race)."""
        path, port = self.metrics_path, self.metrics_port
        health = {
            f"{self.health_prefix}/{name}" for name in ("healthz", "ready", "livez", "version")
        }
        if path is not None and path in health:
            raise ConfigError(
                self._sources.get("metrics_path", "metrics_path"),
                path,
                f"must not be a health path ({', '.join(sorted(health))}); use e.g. /metrics",
            )
        if port is not None and port != 0 and port == self.port:
            named = self._sources.get("port", "port")
            raise ConfigError(
                self._sources.get("metrics_port", "metrics_port"),
                port,
                f"must differ from the app's port ({named}={self.port}); use e.g. 9464",
            )

    def require_metrics_extra(self) -> None:
        """Raise `ConfigError` naming the setting when metrics are asked for (`metrics_path`
        or `metrics_port`) and prometheus-client, the `metrics` extra, is not installed.

        `sf-lifecycle serve` calls it before importing the app, the lifecycle before it
        imports `sf_lifecycle.metrics`: one line saying what to install, not an
        `ImportError` traceback out of the start-up.
        """
        asked = [n for n in ("metrics_path", "metrics_port") if getattr(self, n) is not None]
        if not asked:
            return
        try:
            import prometheus_client  # noqa: F401
        except ImportError:
            name = asked[0]
            raise ConfigError(
                self._sources.get(name, name),
                getattr(self, name),
                "Prometheus metrics need the metrics extra: pip install 'sf-lifecycle[metrics]'",
            ) from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Build settings from `SF_*` variables; keyword arguments that are not None win.

        Args:
            environ: The environment to read, exactly (`{}`: none); `os.environ` when None.
            **overrides: Field values that take precedence over the environment.

        Raises:
            ConfigError: a variable or argument is invalid.
        """
        unknown = set(overrides) - set(ENV_VARS)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        self = cls.__new__(cls)
        given = {k: v for k, v in overrides.items() if v is not None}
        _build(self, given, os.environ if environ is None else environ)
        return self

    def replace(self, **changes: Any) -> Settings:
        """A copy with `changes`: exactly those fields are labelled `code`, every other keeps
        its value and its source (`dataclasses.replace` can only guess which changed).

        Raises:
            TypeError: a name is not a setting.
            ConfigError: a value is invalid, or the result breaks a rule between settings.
        """
        unknown = set(changes) - set(ENV_VARS)
        if unknown:
            raise TypeError(f"unknown setting(s): {', '.join(sorted(unknown))}")
        new = Settings.__new__(Settings)
        kwargs = {name: getattr(self, name) for name in ENV_VARS}
        kwargs.update(changes)
        _build(new, {**kwargs, "_sources": self._sources}, {}, keep=set(ENV_VARS) - set(changes))
        return new

    #: `copy.replace()` (Python 3.13) derives settings the exact way too.
    __replace__ = replace

    def __reduce__(self) -> tuple[Any, ...]:
        # Pickled (multiprocessing, a copy) with its sources, and rebuilt without reading the
        # environment or a command line in force where it is unpickled.
        values = {name: getattr(self, name) for name in ENV_VARS}
        return (_unpickle, (values, dict(self._sources)))

    def sources(self) -> dict[str, str]:
        """Where each setting that is not a default came from: the flag (`--port`), the
        variable (`SF_PORT`) or `code` (an explicit argument)."""
        return {name: ("code" if label == name else label) for name, label in self._sources.items()}

    def describe_sources(self) -> str:
        """One line for the start-up log: each non-default setting, its value and its source.

        A URL's credentials (`redis_url`, `database_url`) are redacted (`redact_url`), and only
        the settings' own values are shown, never the rest of the environment.
        """
        defaults = _DEFAULTS
        parts = []
        for f in dataclasses.fields(self):
            if f.name.startswith("_"):
                continue
            value = getattr(self, f.name)
            source = self.sources().get(f.name)
            if source is None and value == getattr(defaults, f.name):
                continue
            shown = str(value) if f.name in _MODE_FIELDS else repr(value)
            if isinstance(value, Path):
                shown = str(value)
            elif f.name in _SECRET_FIELDS and isinstance(value, str):
                shown = repr(redact_url(value))
            parts.append(f"{f.name}={shown} ({source or 'default'})")
        return ", ".join(parts) or "all defaults"

    def require_state_dir(self) -> Path:
        """The state directory, created (with `dir_mode`) when missing.

        Raises:
            ConfigError: naming `SF_STATE_DIR`, when it is unset, is not a directory or cannot
                be created: a configuration mistake, reported as one (exit 2), not a traceback.
        """
        source = self._sources.get("state_dir", "SF_STATE_DIR")
        if self.state_dir is None:
            raise ConfigError(source, None, "set it (or --state-dir) to a writable directory")
        path = self.state_dir
        try:
            path.mkdir(mode=self.dir_mode, parents=True, exist_ok=True)
        except FileExistsError:
            raise ConfigError(
                source, str(path), "exists and is not a directory; point it at a directory"
            ) from None
        except OSError as exc:
            raise ConfigError(
                source, str(path), f"cannot create the directory: {exc.strerror or exc}"
            ) from None
        return path

    def check_state_dir(self) -> Path:
        """`require_state_dir`, then what a server needs before it starts: the folders the
        library keeps there are folders (no link, no file) and a file can be created in it.

        Raises:
            ConfigError: naming `SF_STATE_DIR` and the problem (exit 2 from the CLI).
        """
        path = self.require_state_dir()
        source = self._sources.get("state_dir", "SF_STATE_DIR")
        for rel in _STATE_SUBDIRS:
            try:
                os.close(open_state_dir(path, rel, None))
            except FileNotFoundError:
                continue  # created when first needed
            except UnsafePath as exc:
                raise ConfigError(source, str(path), str(exc.strerror)) from None
            except OSError as exc:
                raise ConfigError(
                    source, str(path), f"cannot open {rel!r} in it: {exc.strerror or exc}"
                ) from None
        probe = path / f".sf-write-check-{os.getpid()}-{secrets.token_hex(4)}"
        try:
            fd = os.open(probe, _PROBE_FLAGS, self.file_mode)
        except OSError as exc:
            raise ConfigError(
                source,
                str(path),
                f"cannot create a file in it ({exc.strerror or exc}); point it at a writable "
                "directory",
            ) from None
        os.close(fd)
        os.unlink(probe)
        return path


#: Settings that may carry a password: shown through `redact_url` in the start-up log.
_SECRET_FIELDS = frozenset({"database_url", "redis_url"})
#: Folders the library keeps under the state directory (checked by `check_state_dir`).
_STATE_SUBDIRS = ("feedback", "feedback/quarantine", "sessions")
_PROBE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC

#: Field name -> environment variable. The README's configuration table follows this order.
ENV_VARS: dict[str, str] = {
    "grace_ms": "SF_RPC_SHUTDOWN_GRACE_MS",
    "drain_delay_ms": "SF_DRAIN_DELAY_MS",
    "drain_after_probes": "SF_DRAIN_AFTER_PROBES",
    "drain_margin_ms": "SF_DRAIN_MARGIN_MS",
    "state_dir": "SF_STATE_DIR",
    "version": "SF_VERSION",
    "git_sha": "SF_GIT_SHA",
    "replica_id": "SF_REPLICA_ID",
    "host": "SF_HOST",
    "port": "SF_PORT",
    "drain_interval_ms": "SF_DRAIN_INTERVAL_MS",
    "drain_batch_records": "SF_DRAIN_BATCH_RECORDS",
    "orphan_sweep_ms": "SF_ORPHAN_SWEEP_MS",
    "feedback_max_bytes": "SF_FEEDBACK_MAX_BYTES",
    "sse_max_streams": "SF_SSE_MAX_STREAMS",
    "sse_ping_ms": "SF_SSE_PING_MS",
    "sse_retry_ms": "SF_SSE_RETRY_MS",
    "sse_retention_events": "SF_SSE_RETENTION_EVENTS",
    "sse_retention_ms": "SF_SSE_RETENTION_MS",
    "sse_watch": "SF_SSE_WATCH",
    "file_mode": "SF_FILE_MODE",
    "dir_mode": "SF_DIR_MODE",
    "redis_url": "SF_REDIS_URL",
    "health_prefix": "SF_HEALTH_PREFIX",
    "metrics_path": "SF_METRICS_PATH",
    "metrics_port": "SF_METRICS_PORT",
    "log_format": "SF_LOG_FORMAT",
    "access_log": "SF_ACCESS_LOG",
    "liveness_stall_ms": "SF_LIVENESS_STALL_MS",
    "database_url": "SF_DATABASE_URL",
    "database_table": "SF_DATABASE_TABLE",
}

# (minimum, maximum) for integer settings; None means unbounded above.
_INT_RANGES: dict[str, tuple[int, int | None]] = {
    "grace_ms": (0, 24 * 3_600_000),
    "drain_delay_ms": (0, 3_600_000),
    "drain_after_probes": (1, 1_000),
    "drain_margin_ms": (0, 600_000),
    "port": (0, 65_535),
    "metrics_port": (0, 65_535),
    "drain_interval_ms": (1, 3_600_000),
    "drain_batch_records": (1, 1_000_000),
    "orphan_sweep_ms": (100, 3_600_000),
    "feedback_max_bytes": (2, 64 * 1024 * 1024),
    "sse_max_streams": (1, 1_000_000),
    "sse_ping_ms": (100, 3_600_000),
    "sse_retry_ms": (0, 3_600_000),
    "sse_retention_events": (1, 100_000_000),
    "sse_retention_ms": (1_000, 365 * 24 * 3_600_000),
    "liveness_stall_ms": (100, 3_600_000),
}
_ID_FIELDS = ("version", "git_sha", "replica_id")
#: A version may carry PEP 440 / semver local and epoch parts (`1.0.0+local`, `1!2.0`).
_VERSION_CHARS = _ID_CHARS | frozenset("+!~")
#: One DNS label; a host name is dot-separated labels (no port, no scheme, no path).
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)\Z")
_DIGITS = re.compile(r"[0-9]+")
_OCTAL = re.compile(r"[0-7]{1,4}")
#: Mode settings -> the owner bits the library needs to work (the rest is the operator's choice).
_MODE_FIELDS: dict[str, int] = {"file_mode": 0o600, "dir_mode": 0o700}
#: A URL path of plain segments (`/api`, `/internal/sf`); the prefix may also be empty.
_PATH = re.compile(r"(/[A-Za-z0-9._~-]+)+\Z")
_DOT_SEGMENT = re.compile(r"/\.{1,2}(?=/|\Z)")
_LOG_FORMATS = ("text", "json")
_BOOLS = {"1": True, "true": True, "yes": True, "on": True}
_BOOLS.update({"0": False, "false": False, "no": False, "off": False})


def _is_host(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        pass
    else:
        return True
    name = value[:-1] if value.endswith(".") else value
    return 0 < len(name) <= 253 and all(_LABEL.match(label) for label in name.split("."))


def _parse(name: str, var: str, raw: str) -> object:
    # Plain ASCII digits only: `int()` also takes `1_000`, `+5`, `0o600` and other scripts'
    # digits (`٤٠٠٠`), none of which an operator means (no setting may be negative).
    if name in _MODE_FIELDS:
        if not _OCTAL.fullmatch(raw):
            raise ConfigError(var, raw, "an octal mode such as 0600")
        return FileMode(int(raw, 8))
    if name == "access_log":
        if raw.lower() not in _BOOLS:
            raise ConfigError(var, raw, "one of 1, 0, true, false, yes, no, on, off")
        return _BOOLS[raw.lower()]
    if name == "health_prefix" and raw == "/":
        return ""
    if name in _INT_RANGES:
        if name.endswith("_ms"):
            try:
                return parse_ms(raw)
            except ValueError:
                raise ConfigError(var, raw, _describe_range(name)) from None
        if not _DIGITS.fullmatch(raw) or len(raw) > 20:
            raise ConfigError(var, raw, _describe_range(name))
        return int(raw, 10)
    return raw


def _describe_range(name: str) -> str:
    low, high = _INT_RANGES[name]
    text = f"an integer from {low}" + (f" to {high}" if high is not None else " upwards")
    if name.endswith("_ms"):
        text += " (milliseconds, or with a unit: 500ms, 5s, 2m)"
    return text


_DURATION_MS = re.compile(r"([0-9]{1,15})(ms|s|m)?")
_UNIT_MS = {None: 1, "ms": 1, "s": 1_000, "m": 60_000}


def parse_ms(text: str) -> int:
    """Milliseconds of a duration setting: `1500` (milliseconds), `1500ms`, `5s` or `2m`.

    One grammar for every `SF_*_MS` variable, every `--*-ms` flag and the `SF_*` values
    `check-infra` reads: ASCII digits (no sign, no fraction, no `_`) and an optional unit.

    Raises:
        ValueError: anything else.
    """
    match = _DURATION_MS.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"not a duration in milliseconds: {text!r} (e.g. 1500, 500ms, 5s, 2m)")
    return int(match[1], 10) * _UNIT_MS[match[2]]


def _validate(name: str, value: object, source: str) -> None:
    if name in _INT_RANGES:
        if value is None and name in ("drain_after_probes", "metrics_port"):
            return
        low, high = _INT_RANGES[name]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise ConfigError(source, value, _describe_range(name))
    elif name in _MODE_FIELDS:
        need = _MODE_FIELDS[name]
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or not 0 <= value <= 0o777
            or value & need != need
        ):
            raise ConfigError(
                source, value, f"an octal mode from 0{need:o} to 0777 (owner 0{need:o} required)"
            )
    elif name in _ID_FIELDS:
        chars, listed = (
            (_VERSION_CHARS, "A-Z a-z 0-9 . _ - + ! ~")
            if name == "version"
            else (_ID_CHARS, "A-Z a-z 0-9 . _ -")
        )
        if value is not None and (
            not isinstance(value, str) or not value or len(value) > 128 or set(value) - chars
        ):
            raise ConfigError(source, value, f"1-128 characters from {listed}")
    elif name == "host":
        if not isinstance(value, str) or not _is_host(value):
            raise ConfigError(
                source, value, "an IP address or a host name (no port, no scheme, no path)"
            )
    elif name == "redis_url" and value is not None:
        from ._events_redis import check_redis_url  # no redis-py import: the URL's shape only

        check_redis_url(value, source)
    elif name in ("health_prefix", "metrics_path"):
        if value is None and name == "metrics_path":
            return
        if not isinstance(value, str) or not (
            (value == "" and name == "health_prefix")
            or (_PATH.match(value) and not _DOT_SEGMENT.search(value))
        ):
            # `.` and `..` segments: every HTTP client and proxy normalises them away, so
            # `/../healthz` could never be requested.
            raise ConfigError(
                source,
                value,
                "a path such as /api (segments of A-Z a-z 0-9 . _ ~ -, not . or .., no "
                "trailing slash)" + ("; / for the root" if name == "health_prefix" else ""),
            )
    elif name == "log_format":
        if value not in _LOG_FORMATS:
            raise ConfigError(source, value, "text or json")
    elif name == "access_log":
        if not isinstance(value, bool):
            raise ConfigError(source, value, "true or false")
    elif name == "database_url" and value is not None:
        from ._pg import check_url  # no driver import: only the URL's shape

        if not isinstance(value, str):
            raise ConfigError(source, "<not a string>", "a postgresql:// URL")
        check_url(value, source)
    elif name == "database_table":
        from ._pg import check_identifier  # no driver import

        check_identifier(value, source)
    elif name == "sse_watch":
        if value not in ("auto", "inotify", "poll"):
            raise ConfigError(source, value, "one of auto, inotify, poll")
    elif name == "state_dir" and value is not None and not isinstance(value, Path):
        raise ConfigError(source, value, "a filesystem path")


#: The built-in defaults: built by the generated `__init__` (replaced below), so neither the
#: environment nor a command line in force reaches them.
_DEFAULTS = Settings()


# -- precedence -------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _CommandLine:
    flags: Mapping[str, tuple[str, object]]  # field -> (flag as typed, parsed value)
    names: Mapping[str, str]  # field -> its flag, for errors that tell what to change


#: The command line of the running `sf-lifecycle serve` (`command_line`), else None.
_overlay: list[_CommandLine] = []


class _Sources(dict[str, str]):
    """Field -> where its value came from, and the values it was recorded for.

    `dataclasses.replace()` hands an instance's `_sources` back with every field: a field
    passed the very value it had (`is`) was not changed and keeps its source; any other
    value is an explicit argument.
    """

    __slots__ = ("recorded",)

    def __init__(self, sources: Mapping[str, str]) -> None:
        super().__init__(sources)
        self.recorded: dict[str, object] = {}


@contextlib.contextmanager
def command_line(
    flags: Mapping[str, tuple[str, str]], names: Mapping[str, str] | None = None
) -> Iterator[None]:
    """Put the command line in force: it wins over every other source in every `Settings`
    built inside (`sf-lifecycle serve` holds it while it imports and serves the app).

    Args:
        flags: Field -> (flag as typed, raw value), for the flags given.
        names: Field -> flag, for every flag the command has: an error about a setting then
            names the flag that would change it.

    Raises:
        ConfigError: a flag's value is invalid (naming the flag), on entry.
    """
    parsed: dict[str, tuple[str, object]] = {}
    for name, (flag, raw) in flags.items():
        if name not in ENV_VARS:
            raise TypeError(f"unknown setting: {name}")
        value = _parse(name, flag, raw.strip())
        parsed[name] = (flag, Path(str(value)) if name == "state_dir" else value)
    _overlay.append(_CommandLine(parsed, dict(names or {})))
    try:
        yield
    finally:
        _overlay.pop()


_generated_init = Settings.__init__


def _build(
    self: Settings,
    kwargs: dict[str, Any],
    environ: Mapping[str, str],
    keep: set[str] | None = None,
) -> None:
    """The one rule: explicit arguments, then `environ` for every field not given, then the
    command line in force over all of them; each value's source recorded.

    `keep` names the fields copied unchanged from the settings whose `_sources` are passed
    (`Settings.replace`): they keep their source, every other given field is the code's.
    """
    given = kwargs.pop("_sources", None) or {}
    if keep is None and isinstance(given, _Sources):
        # `dataclasses.replace()` passes every field: one passed the very object it had was
        # not changed (the best it can tell; `Settings.replace` knows).
        keep = {n for n, v in kwargs.items() if n in given.recorded and v is given.recorded[n]}
    sources: dict[str, str]
    if keep is None:  # a plain mapping labels the values given (read from elsewhere)
        sources, keep = dict(given), set()
    else:
        sources = {name: given[name] for name in keep if name in given}
    for name, value in kwargs.items():
        if name not in keep:
            sources.setdefault(name, name)  # an explicit argument: its source is the code
            if name in _INT_RANGES and name.endswith("_ms") and isinstance(value, str):
                kwargs[name] = _parse(name, name, value.strip())  # "5s", as everywhere
    for name, var in ENV_VARS.items():
        if name not in kwargs:
            raw = environ.get(var)
            if raw is not None and raw.strip():
                kwargs[name] = _parse(name, var, raw.strip())
                sources[name] = var
    if _overlay:
        for name, (flag, value) in _overlay[-1].flags.items():
            kwargs[name], sources[name] = value, flag
    if isinstance(kwargs.get("state_dir"), str):
        kwargs["state_dir"] = Path(kwargs["state_dir"])
    record = _Sources(sources)
    _generated_init(self, **kwargs, _sources=record)
    record.recorded = {name: getattr(self, name) for name in ENV_VARS}


def _unpickle(values: dict[str, Any], sources: dict[str, str]) -> Settings:
    """A pickled `Settings` as it was: its values and sources, no environment read."""
    self = Settings.__new__(Settings)
    record = _Sources(sources)
    _generated_init(self, **values, _sources=record)
    record.recorded = {name: getattr(self, name) for name in ENV_VARS}
    return self


@functools.wraps(_generated_init)
def _init(self: Settings, **kwargs: Any) -> None:
    """`Settings(...)`: the fields given, `os.environ` under them, the command line over."""
    _build(self, kwargs, os.environ)


# Replaced after the class is built, so that the dataclass keeps its generated signature for
# type checkers and users (`Settings(port=...)`) while every construction path, `from_env`,
# `dataclasses.replace` and plain calls alike, follows the one rule and records its sources.
setattr(Settings, "__init__", _init)  # noqa: B010


#: `SF_*` names the project uses outside `Settings` (test harnesses, examples, infra), which the
#: typo check must not report.
_OTHER_VARS = frozenset(
    {
        "SF_CRASH_AT",
        "SF_HOSTNAME",
        "SF_IMAGE",
        "SF_CANDIDATE_IMAGE",
        "SF_TESTING_APP",
        "SF_TESTING_ARM_FILE",
    }
)


def unknown_variables(
    environ: Mapping[str, str] | None = None, flags: Mapping[str, str] | None = None
) -> list[tuple[str, str]]:
    """`SF_*` variables that are not settings but look like one: (name, closest setting).

    `SF_DRAIN_DELAY=1` is silently ignored otherwise, and the 5 s default applies. A name is
    compared with the variables, and with `SF_` + a field or flag name (`SF_GRACE_MS`, from
    `grace_ms` and `--grace-ms`, means `SF_RPC_SHUTDOWN_GRACE_MS`). Names not close to any
    (an application's own `SF_*` variables) are left alone.

    Args:
        environ: The environment; `os.environ` when None.
        flags: Field -> flag of the command (`--grace-ms`), also compared.
    """
    env = os.environ if environ is None else environ
    aliases: dict[str, str] = {var: var for var in ENV_VARS.values()}
    for name, var in ENV_VARS.items():
        aliases.setdefault("SF_" + name.upper(), var)
    for name, flag in (flags or {}).items():
        aliases.setdefault("SF_" + flag.lstrip("-").replace("-", "_").upper(), ENV_VARS[name])
    out = []
    for name in sorted(env):
        if not name.startswith("SF_") or name in ENV_VARS.values() or name in _OTHER_VARS:
            continue
        close = difflib.get_close_matches(name, aliases, n=1, cutoff=0.75)
        if not close:  # `SF_HOST_NAME`: a variable with words added
            longer = [a for a in aliases if name.startswith(a + "_")]
            close = [max(longer, key=len)] if longer else []
        if close:
            out.append((name, aliases[close[0]]))
    return out


def package_version() -> str:
    """The installed distribution's version (`/api/version`, `--version`, `sf_info`)."""
    try:
        return importlib.metadata.version("sf-lifecycle")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - running from a source tree
        return "0+unknown"
