"""An app that pins settings in code (test_cli): prints what it got, on one stdout line."""

import json

from starlette.applications import Starlette

from sf_lifecycle import Lifecycle, Settings

lifecycle = Lifecycle(Settings(replica_id="a", log_format="json"))
app = lifecycle.install(Starlette())
s = lifecycle.settings
shown = {"drain_delay_ms": s.drain_delay_ms, "replica_id": s.replica_id, "port": s.port}
print("SETTINGS " + json.dumps(shown, sort_keys=True), flush=True)
