"""A module whose import raises, as an app missing its configuration does (test_cli)."""

raise RuntimeError("no database URL")
