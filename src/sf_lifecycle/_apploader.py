"""Loading `module:attribute` for `serve` and `queue recover --app`, with one line on failure.

A bad app path is the most common start-up mistake; both commands turn every way it can fail
(no module, no attribute, an import that raises, an object that is not an ASGI callable) into
`AppNotLoaded` with the one line to print, and exit 6.
"""

from __future__ import annotations

from typing import Any

from ._errors import ConfigError

__all__ = ["AppNotLoaded", "import_app"]


class AppNotLoaded(Exception):
    """`MODULE:APP` could not be loaded; the message is the one line to print."""


def import_app(spec: str) -> Any:
    """Import `module:attribute`; any failure is `AppNotLoaded` with one line saying which."""
    import importlib

    module_name, sep, attrs = spec.partition(":")
    if not sep or not module_name or not attrs:
        raise AppNotLoaded(f"app {spec!r}: expected module:attribute, e.g. myapp.main:app")
    try:
        obj: Any = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and module_name.startswith(exc.name):
            raise AppNotLoaded(
                f"app {spec!r}: no module named {exc.name!r} (run from the directory that "
                "contains it, or install it)"
            ) from exc
        raise AppNotLoaded(f"app {spec!r}: importing {module_name} raised {exc!r}") from exc
    except ConfigError:
        raise  # a setting the app built is invalid: exit 2 naming it
    except BaseException as exc:
        if isinstance(exc, KeyboardInterrupt):
            raise
        raise AppNotLoaded(f"app {spec!r}: importing {module_name} raised {exc!r}") from exc
    for attr in attrs.split("."):
        try:
            obj = getattr(obj, attr)
        except AttributeError:
            raise AppNotLoaded(
                f"app {spec!r}: module {module_name} has no attribute {attrs!r}"
            ) from None
    if not callable(obj):
        # Served, it would pass the health checks and answer every request 500.
        raise AppNotLoaded(
            f"app {spec!r}: is a {type(obj).__name__}, not an ASGI app (not callable)"
        )
    return obj
