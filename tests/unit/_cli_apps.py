"""A module `serve` can import but that has no attribute `nope` (test_cli)."""

app = None
