"""The `sf-lifecycle` command line.

    sf-lifecycle serve MODULE:APP [--host H] [--port P] [--state-dir DIR] [uvicorn flags] ...
    sf-lifecycle queue status|recover --state-dir DIR [--json]
    sf-lifecycle check-infra PATH... [--json]
    sf-lifecycle rollout --weights FILE --traefik URL [--steps 10,50,100] [--hold 30s] ...
    sf-lifecycle --version

`serve` puts its flags in force (`_config.command_line`) before it imports the app, so every
`Settings` the app builds, even with explicit arguments, takes the flags over its arguments and
the `SF_*` environment under them (the precedence in `_config`). The flags are also exported as
`SF_*` variables, for code that reads the environment itself. The CLI, not the library,
configures logging.

Every error a user can cause from the command line or the environment is one line on stderr
(`sf-lifecycle: ...`, no traceback unless `--debug`) and an `ExitCode`: 2 for configuration
(the line names the flag or the variable), 6 when the app cannot be imported.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

from ._apploader import AppNotLoaded, import_app
from ._config import ENV_VARS, Settings, command_line, package_version, unknown_variables
from ._errors import ConfigError, UnsafePath
from ._logging import configure_logging
from ._runner import ExitCode

__all__ = ["main"]

logger = logging.getLogger("sf_lifecycle.cli")

_SERVE_FLAGS = {
    "host": "--host",
    "port": "--port",
    "state_dir": "--state-dir",
    "grace_ms": "--grace-ms",
    "drain_delay_ms": "--drain-delay-ms",
    "drain_after_probes": "--drain-after-probes",
    "drain_margin_ms": "--drain-margin-ms",
    "replica_id": "--replica-id",
}

#: Sub-commands contributed by other modules: name -> (add arguments, run). Filled below.
Command = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]

#: One line per sub-command for `sf-lifecycle --help`.
_HELP = {
    "serve": "serve an ASGI app under uvicorn with a drain-aware SIGTERM",
    "queue": "inspect (status) or repair (recover) a feedback queue offline",
    "check-infra": "check compose, Kubernetes and Traefik files against the shutdown timings",
    "rollout": "shift Traefik weights to a candidate step by step, gated on its errors",
}


#: `--log-level` choices, as uvicorn's; `trace` is uvicorn's level 5, below debug.
_LEVELS = {"critical": 50, "error": 40, "warning": 30, "info": 20, "debug": 10, "trace": 5}


#: Fields of a command's JSON error besides `error` and `exit` (its own refusals' shape).
_JSON_ERROR_SHAPE: dict[str, dict[str, object]] = {"check-infra": {"ok": False}}


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, not the usage block: the error and where to read more.

    With `json_errors` (`--json` on the command line) the error is also one JSON object on
    stdout, `{"error": ..., "exit": 2}` in the command's shape: a script parsing the answer
    gets one whatever went wrong.
    """

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if self.json_errors:
            command = self.prog.split(" ")[1] if " " in self.prog else ""
            body = {**_JSON_ERROR_SHAPE.get(command, {}), "error": message}
            print(json.dumps({**body, "exit": int(ExitCode.CONFIG_ERROR)}))
        self.exit(ExitCode.CONFIG_ERROR, f"sf-lifecycle: {message} (see {self.prog} --help)\n")


def _parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """`parser` and every sub-command parser under it, each told (`_usage`) it is the one
    whose help an unknown argument should point to."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in dict.fromkeys(action.choices.values()):  # aliases: once
                child.set_defaults(_usage=child)
                found.extend(_parsers(child))
    return found


def _positive_int(raw: str) -> int:
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        # argparse names the flag: `argument --backlog: '0': expected ...`
        raise argparse.ArgumentTypeError(f"{raw!r}: expected an integer >= 1")
    return int(raw)


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.description = (
        "Serve an ASGI app: on SIGTERM /api/healthz answers 503, the server keeps serving for "
        "the drain delay, then closes its listeners and drains within the grace budget. "
        "Precedence of settings: these flags > explicit arguments in code > SF_* variables > "
        "defaults. Durations (--*-ms) take milliseconds or a unit: 500ms, 5s, 2m."
    )
    p.add_argument("app", help="the ASGI app, as module:attribute (e.g. examples.sf_server:app)")
    for field, flag in _SERVE_FLAGS.items():
        p.add_argument(flag, dest=field, default=None, help=f"overrides {ENV_VARS[field]}")
    p.add_argument("--log-level", default="info", choices=list(_LEVELS), help="as uvicorn's")
    p.add_argument(
        "--log-format",
        dest="log_format",
        default=None,
        choices=["text", "json"],
        help="sets SF_LOG_FORMAT: text (default) or json, one object per line",
    )
    p.add_argument(
        "--access-log",
        dest="access_log",
        default=None,
        action=argparse.BooleanOptionalAction,
        help="log every request (sets SF_ACCESS_LOG; off by default)",
    )
    p.add_argument(
        "--debug", action="store_true", help="print the traceback of an app that fails to import"
    )
    uv = p.add_argument_group("uvicorn", "passed to uvicorn.Config (same meaning as in uvicorn)")
    uv.add_argument(
        "--proxy-headers",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="trust X-Forwarded-For/-Proto from --forwarded-allow-ips (uvicorn's default: on)",
    )
    uv.add_argument("--forwarded-allow-ips", default=None, metavar="IPS")
    uv.add_argument("--root-path", default=None, metavar="PATH", help="ASGI root_path")
    uv.add_argument("--uds", default=None, metavar="PATH", help="bind a Unix socket instead")
    uv.add_argument("--ssl-keyfile", default=None, metavar="FILE")
    uv.add_argument("--ssl-certfile", default=None, metavar="FILE")
    uv.add_argument(
        "--log-config",
        default=None,
        metavar="FILE",
        help="logging configuration (.json, .yaml, .ini) instead of the CLI's own",
    )
    uv.add_argument(
        "--timeout-keep-alive",
        type=_positive_int,
        default=None,
        metavar="SECONDS",
    )
    uv.add_argument("--limit-concurrency", type=_positive_int, default=None, metavar="N")
    uv.add_argument("--backlog", type=_positive_int, default=None, metavar="N")


def _uvicorn_options(args: argparse.Namespace) -> dict[str, Any]:
    """The uvicorn flags given, as `uvicorn.Config` arguments; files are checked here so that
    a typo is one line naming the flag, not a traceback out of uvicorn's start-up."""
    # `access_log` comes from the settings (`--access-log` is one, `SF_ACCESS_LOG`): `serve`.
    options: dict[str, Any] = {"log_config": None}
    for flag in ("ssl_keyfile", "ssl_certfile", "log_config"):
        path = getattr(args, flag)
        if path is not None and not Path(path).is_file():
            raise ConfigError("--" + flag.replace("_", "-"), path, "no such file")
    if (args.ssl_keyfile is None) != (args.ssl_certfile is None):
        given = "--ssl-keyfile" if args.ssl_keyfile else "--ssl-certfile"
        raise ConfigError(given, getattr(args, given[2:].replace("-", "_")), "needs the other")
    if args.ssl_certfile is not None:
        _check_tls(args.ssl_certfile, args.ssl_keyfile)
    if args.log_config is not None:
        _check_log_config(args.log_config)
    if args.uds is not None:
        parent = Path(args.uds).parent
        if not parent.is_dir():
            raise ConfigError("--uds", args.uds, f"no such directory: {parent}")
    for name in (
        "proxy_headers",
        "forwarded_allow_ips",
        "root_path",
        "uds",
        "ssl_keyfile",
        "ssl_certfile",
        "log_config",
        "timeout_keep_alive",
        "limit_concurrency",
        "backlog",
    ):
        value = getattr(args, name)
        if value is not None:
            options[name] = value
    return options


def _check_tls(certfile: str, keyfile: str) -> None:
    """Load the pair as uvicorn will, so a wrong file is one line naming the flags."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError, ValueError) as exc:
        raise ConfigError(
            "--ssl-certfile/--ssl-keyfile",
            f"{certfile}, {keyfile}",
            f"cannot load the certificate and its key ({getattr(exc, 'reason', None) or exc}); "
            "give PEM files of a certificate and the key that matches it",
        ) from None


def _check_log_config(path: str) -> None:
    """Apply the logging configuration as uvicorn will (it does so again at start): a file
    uvicorn cannot read is one line naming `--log-config`, not a traceback."""
    import uvicorn

    try:
        uvicorn.Config(_not_an_app, log_config=path)
    except Exception as exc:
        raise ConfigError(
            "--log-config",
            path,
            f"not a logging configuration uvicorn can apply ({type(exc).__name__}: {exc}); "
            "give a dictConfig .json or .yaml file or a fileConfig .ini file",
        ) from None


async def _not_an_app(scope: Any, receive: Any, send: Any) -> None:  # pragma: no cover
    raise NotImplementedError


def _check_uds_free(path: str) -> str | None:
    """The one line to print when `--uds` names something that is not a socket (a file the
    bind would fail on, and must not delete), else None."""
    import stat

    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return None
    if stat.S_ISSOCK(mode):
        return None  # a stale socket of an earlier run: replaced, as uvicorn does
    return (
        f"--uds={path}: cannot listen there, it exists and is not a socket (left as it is); "
        f"choose another path (exit {ExitCode.STARTUP_FAILED:d})"
    )


def _metrics_port_in_use(settings: Settings) -> str | None:
    """The one line to print when the metrics port cannot be bound, else None.

    Checked before the app is imported: `serve` is one process per replica, so a port in use
    is a mistake to report (exit 3), where a worker of a multi-process server only warns
    (`Lifecycle`). Bound with `SO_REUSEADDR`, as the metrics server binds it.
    """
    import socket

    port = settings.metrics_port
    assert port is not None
    family = socket.AF_INET6 if ":" in settings.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((settings.host, port))
        except OSError as exc:
            source = settings.sources().get("metrics_port", ENV_VARS["metrics_port"])
            return (
                f"{source}={port}: cannot listen on {settings.host}:{port} for metrics "
                f"({exc.strerror or exc}); choose a free port (exit {ExitCode.STARTUP_FAILED:d})"
            )
    return None


def _serve(args: argparse.Namespace) -> int:
    flags = {
        field: (flag, str(getattr(args, field)))
        for field, flag in _SERVE_FLAGS.items()
        if getattr(args, field) is not None
    }
    if args.log_format is not None:
        flags["log_format"] = ("--log-format", args.log_format)
    if args.access_log is not None:
        flags["access_log"] = ("--access-log", "1") if args.access_log else ("--no-access-log", "0")
    for flag, raw in flags.values():
        if not raw.strip():  # `--state-dir "$UNSET"` must not mean the current directory
            raise ConfigError(flag, raw, "is empty; give a value or leave the flag out")
    options = _uvicorn_options(args)
    names = {**_SERVE_FLAGS, "log_format": "--log-format", "access_log": "--access-log"}
    saved = {ENV_VARS[f]: os.environ.get(ENV_VARS[f]) for f in flags}
    try:
        with command_line(flags, names):
            for field, (_, raw) in flags.items():
                os.environ[ENV_VARS[field]] = raw  # for code that reads the environment itself
            return _serve_in_force(args, options)
    finally:  # `main()` in a process that lives on (a test) leaves its environment as it was
        for var, value in saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def _serve_in_force(args: argparse.Namespace, options: dict[str, Any]) -> int:
    from ._runner import serve

    settings = Settings()  # fail before importing the app, naming the flag or variable
    configure_logging(settings.log_format, _LEVELS[args.log_level])
    for name, close in unknown_variables(flags=_SERVE_FLAGS):
        logger.warning("%s is not a setting and is ignored; did you mean %s?", name, close)
    settings.require_metrics_extra()
    if settings.metrics_port:
        unbound = _metrics_port_in_use(settings)
        if unbound is not None:
            print(f"sf-lifecycle: {unbound}", file=sys.stderr)
            return ExitCode.STARTUP_FAILED
    if settings.state_dir is not None:
        # A file there, a link or a file where a folder belongs, a read-only or pseudo file
        # system: exit 2 with one line, not a traceback out of the app's import.
        settings.check_state_dir()
    if args.uds is not None:
        taken = _check_uds_free(args.uds)
        if taken is not None:
            print(f"sf-lifecycle: {taken}", file=sys.stderr)
            return ExitCode.STARTUP_FAILED
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        app = import_app(args.app)
    except AppNotLoaded as exc:
        if args.debug:
            traceback.print_exception(exc.__cause__ or exc)
        print(f"sf-lifecycle: {exc}", file=sys.stderr)
        return ExitCode.APP_NOT_LOADED
    from ._lifecycle import Lifecycle

    lifecycle = Lifecycle.of(app)
    if lifecycle is not None and lifecycle.settings.log_format != settings.log_format:
        # The app's own settings (`Settings(log_format="json")` in code) decide the format.
        configure_logging(lifecycle.settings.log_format, _LEVELS[args.log_level])
    try:
        return serve(app, settings=settings, own_process=True, **options)
    except UnsafePath as exc:  # changed after the check, while the app was imported
        raise ConfigError(
            settings.sources().get("state_dir", ENV_VARS["state_dir"]),
            settings.state_dir,
            str(exc.strerror),
        ) from None


def _commands() -> dict[str, Command]:
    from ._infra_check import COMMAND as check_infra
    from ._queue_cli import COMMAND as queue
    from ._rollout_cli import COMMAND as rollout

    return {
        "serve": (_serve_args, _serve),
        "queue": queue,
        "check-infra": check_infra,
        "rollout": rollout,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `sf-lifecycle` and `python -m sf_lifecycle`; returns the exit code."""
    parser = _Parser(
        prog="sf-lifecycle",
        description="Zero-downtime upgrades for ASGI services. Exit codes: 0 ok, 1 check "
        "failed, 2 configuration error, 3 start-up failed, 4 grace budget exceeded, 5 shutdown "
        "hook failed, 6 app not importable, 130 forced (README, exit codes).",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, (add_args, run) in _commands().items():
        add_args(sub.add_parser(name, help=_HELP[name], description=_HELP[name]))
        runners[name] = run
    argv = list(sys.argv[1:] if argv is None else argv)
    for each in _parsers(parser):
        if isinstance(each, _Parser):
            each.json_errors = "--json" in argv
    args, unknown = parser.parse_known_args(argv)
    if unknown:  # pointed at the help of the command that did not know them
        usage: argparse.ArgumentParser = getattr(args, "_usage", parser)
        usage.error(f"unrecognized arguments: {' '.join(unknown)}")
    configure_logging("text", _LEVELS[getattr(args, "log_level", "info")])
    try:
        return runners[args.command](args)
    except ConfigError as exc:
        print(f"sf-lifecycle: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
