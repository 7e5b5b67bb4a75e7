"""Real Traefik with the blue/green routing of `infra/`: a weighted service over two pools.

`BlueGreenProxy` is `TraefikProxy` serving `TraefikRouting.bluegreen_config` (the stable pool and
the candidate pool, the production router on the weighted service, the candidate's own router)
plus the weights file that `sf-lifecycle rollout` rewrites, with Prometheus metrics on the
internal entrypoint (`api_url`). The stable and candidate URLs are fixed for the proxy's life, as
container names are in production; a replica that is not running is simply `DOWN`.

The weights file is written once, at start (stable 100, candidate 0); after that it belongs to
the rollout under test (or to `set_weights`).
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .._traefik_api import TraefikAPI, TraefikAPIError
from .._weights import WeightsFile
from .traefik import TraefikProxy, TraefikRouting

__all__ = ["BlueGreenProxy"]


class BlueGreenProxy(TraefikProxy):
    """Traefik in front of a stable pool and a candidate pool, weights in a watched file.

    Args:
        stable: Base URL of the stable replica (the pool `routing.service`).
        candidate: Base URL of the candidate replica (the pool `routing.candidate_service`).
        routing: `TraefikRouting()` matches `infra/traefik/dynamic/`.
        **kwargs: As for `TraefikProxy`.
    """

    def __init__(
        self,
        stable: str,
        candidate: str,
        *,
        routing: TraefikRouting | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__([stable], routing=routing, **kwargs)
        self.candidate_url = candidate.rstrip("/")
        self.weights_path = self.dynamic_dir / "weights.yaml"

    def __enter__(self) -> BlueGreenProxy:
        if self.proc is None:
            self.start()
        return self

    def _write_dynamic(self, servers: Sequence[str]) -> None:
        self._write_doc(
            self.dynamic_path, self.routing.bluegreen_config(servers, [self.candidate_url])
        )
        if not self.weights_path.exists():
            self._write_doc(self.weights_path, self.routing.weights_config())

    # -- weights ---------------------------------------------------------------------------
    def set_weights(self, stable: int, candidate: int) -> None:
        """Rewrite the weights file (as `rollout` does) and wait until Traefik serves them."""
        wf = WeightsFile.load(self.weights_path)
        want = {wf.stable: stable, wf.candidate: candidate}
        wf.write(want)
        self._poll(lambda: self.served_weights() == want, _deadline(10.0), f"weights {want}")

    def file_weights(self) -> dict[str, int]:
        """The weights in the file now: stable child first."""
        return WeightsFile.load(self.weights_path).weights

    def served_weights(self) -> dict[str, int] | None:
        """The weights Traefik's API reports for the weighted service (None: absent/disabled)."""
        try:
            return self.api.weights(f"{self.routing.weighted_service}@file")
        except TraefikAPIError:
            return None

    # -- the candidate -----------------------------------------------------------------------
    def candidate_status(self) -> dict[str, str]:
        """Traefik's health view of the candidate pool: URL -> `UP` / `DOWN`."""
        try:
            return self.api.server_status(f"{self.routing.candidate_service}@file")
        except TraefikAPIError:
            return {}

    def verify_status(self) -> dict[str, str]:
        """Traefik's health view of the candidate through its verification service (its own
        health check, probed apart from the candidate pool's): URL -> `UP` / `DOWN`."""
        try:
            return self.api.server_status(f"{self.routing.verify_service}@file")
        except TraefikAPIError:
            return {}

    def candidate_request(
        self, path: str, *, headers: Mapping[str, str] | None = None, timeout: float = 5.0
    ) -> tuple[int, dict[str, str], bytes]:
        """A request through the candidate's own router (its `Host`), for verification."""
        host = self.routing.candidate_rule.split("`")[1]
        return self.request(path, headers={"Host": host, **(headers or {})}, timeout=timeout)

    def metrics_text(self) -> str:
        """Traefik's `/metrics` on the internal entrypoint."""
        status, body = TraefikAPI(self.api_url, timeout_s=5.0).get("/metrics")
        if status != 200:
            raise RuntimeError(f"/metrics answered {status}")
        return body.decode()

    @property
    def files(self) -> list[Path]:
        """The files in the watched directory (the routing file and the weights file)."""
        return sorted(self.dynamic_dir.iterdir())


def _deadline(seconds: float) -> float:
    return time.monotonic() + seconds
