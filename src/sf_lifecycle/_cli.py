"""The `sf-lifecycle` command line.

    sf-lifecycle serve MODULE:APP [--host H] [--port P] [--state-dir DIR] ...
    sf-lifecycle queue status|recover --state-dir DIR
    sf-lifecycle check-infra PATH...
    sf-lifecycle rollout --weights FILE --traefik URL [--steps 10,50,100] [--hold 30s] ...

`serve` turns its flags into `SF_*` variables before importing the app, so the app's own
`Settings.from_env()` sees them: one source of truth whether a value came from a flag, the
environment or the container spec. The CLI, not the library, configures logging.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from ._config import ENV_VARS, Settings
from ._errors import ConfigError, UnsafePath
from ._logging import configure_logging
from ._runner import ExitCode

__all__ = ["main"]

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


def _serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("app", help="the ASGI app, as module:attribute (e.g. examples.sf_server:app)")
    for field, flag in _SERVE_FLAGS.items():
        p.add_argument(flag, dest=field, default=None, help=f"sets {ENV_VARS[field]}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
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


def _serve(args: argparse.Namespace) -> int:
    from ._runner import serve

    for field in (*_SERVE_FLAGS, "log_format"):
        value = getattr(args, field)
        if value is not None:
            os.environ[ENV_VARS[field]] = str(value)
    if args.access_log is not None:
        os.environ[ENV_VARS["access_log"]] = "1" if args.access_log else "0"
    settings = Settings.from_env()  # fail before importing the app, with the variable's name
    configure_logging(settings.log_format, args.log_level)
    if settings.state_dir is not None:
        # A file there, a link or a file where a folder belongs, a read-only or pseudo file
        # system: exit 2 with one line, not a traceback out of the app's import.
        settings.check_state_dir()
    if "" not in sys.path and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return serve(args.app, log_config=None, access_log=settings.access_log, own_process=True)
    except UnsafePath as exc:  # changed after the check, while the app was imported
        raise ConfigError(ENV_VARS["state_dir"], settings.state_dir, str(exc.strerror)) from None


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
    parser = argparse.ArgumentParser(
        prog="sf-lifecycle", description="Zero-downtime upgrades for ASGI services."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    runners: dict[str, Callable[[argparse.Namespace], int]] = {}
    for name, (add_args, run) in _commands().items():
        add_args(sub.add_parser(name))
        runners[name] = run
    args = parser.parse_args(argv)
    configure_logging("text", getattr(args, "log_level", "info"))
    try:
        return runners[args.command](args)
    except ConfigError as exc:
        print(f"sf-lifecycle: {exc}", file=sys.stderr)
        return ExitCode.CONFIG_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
