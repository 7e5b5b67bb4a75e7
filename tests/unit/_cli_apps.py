"""A module `serve` can import but that has no attribute `nope` (test_cli)."""

app = None

#: Not an ASGI app: `serve _cli_apps:not_callable` must refuse it (exit 6), not serve it.
not_callable = 42
