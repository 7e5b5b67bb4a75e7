"""`check-infra` for Traefik: each service's health check and sticky cookie, the static config.

A Traefik service is read into the one routing model, `TraefikRouting` (from a file-provider
document, or from compose labels through `label_tree`), and judged by `check_routing`: the health
check must poll `/api/healthz` and notice the 503 inside the drain delay, and a sticky cookie keeps
reconnecting SSE clients on their replica. The blue/green rules live in `_infra_bluegreen`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from ._infra_bluegreen import StaticConfig, static_from_doc
from ._infra_common import (
    DELAY_VAR,
    Finding,
    HealthPaths,
    Reporter,
    fmt_ms,
    lower_keys,
    scalar,
)
from ._traefik_routing import TraefikRouting

__all__ = ["check_routing", "check_traefik_static", "file_provider_routing", "label_tree"]


def label_tree(labels: Mapping[str, str]) -> dict[str, Any]:
    """`traefik.http.services.sf.loadbalancer.healthcheck.path=/x` -> nested, lower-cased dict."""
    root: dict[str, Any] = {}
    for key, value in labels.items():
        parts = key.lower().split(".")
        if parts[0] != "traefik":
            continue
        node = root
        for p in parts[1:-1]:
            nxt = node.setdefault(p, {})
            if not isinstance(nxt, dict):
                break
            node = nxt
        else:
            node[parts[-1]] = value
    return root


def check_routing(
    r: TraefikRouting,
    where: str,
    delay_ms: int,
    report: Reporter,
    delay_source: str,
    paths: HealthPaths | None = None,
) -> None:
    """Report what in one service's health check and sticky cookie breaks the drain.

    `paths`: the health paths under the service's `SF_HEALTH_PREFIX` (`/api` when None).
    """
    paths = paths or HealthPaths()
    if r.health_path is None:
        report.error(
            f"{where}: no health check. Traefik keeps sending requests to a draining replica "
            f"until its listener closes, and each of them fails. Add a health check on "
            f"{paths.healthz} (interval 2s, timeout 1s)."
        )
        return
    if r.health_path not in paths.readiness:
        report.warning(
            f"{where}: the health check polls {r.health_path}, which does not gate on "
            f"readiness: it does not answer 503 while the replica drains, recovers its queue "
            f"or fails a readiness check. Poll {paths.healthz}."
        )
    interval_ms, timeout_ms = r.health_interval_ms, r.health_timeout_ms
    if interval_ms + timeout_ms > delay_ms:
        longer = "interval" if interval_ms > delay_ms else "interval + timeout"
        report.error(
            f"{where}: health check {longer} ({fmt_ms(interval_ms)} + "
            f"{fmt_ms(timeout_ms)}) does not fit inside the drain delay "
            f"({delay_source} = {delay_ms} ms): the replica can close its listener before "
            f"Traefik has seen a 503. Use interval 2s, timeout 1s, or raise {DELAY_VAR}."
        )
    if r.cookie_name is None:
        report.warning(
            f"{where}: no sticky cookie; SSE clients that reconnect may land on another replica "
            f"and lose per-replica state. Add sticky.cookie (name sf-aff, httpOnly, sameSite lax)."
        )
    else:
        shown = r.drain_fields()["sticky cookie name"]
        if not r.cookie_http_only:
            report.warning(f"{where}: sticky cookie {shown} is not httpOnly")
        if not r.cookie_same_site:
            report.warning(f"{where}: sticky cookie {shown} has no sameSite (use lax)")


def file_provider_routing(
    doc: Mapping[str, Any],
    file: str,
    delay_ms: int,
    out: list[Finding],
    pinned: frozenset[str] = frozenset(),
    paths: HealthPaths | None = None,
) -> dict[str, TraefikRouting]:
    """Check and return the routing of each load-balancer service of a file-provider document.

    Args:
        pinned: Children of a weighted service with a sticky cookie: that cookie pins the
            client, so they need none of their own.
        paths: The replicas' health paths (their `SF_HEALTH_PREFIX`); `/api` when None.
    """
    report = Reporter(file, out)
    lowered = lower_keys(doc)
    services = (lowered.get("http") or {}).get("services") or {}
    found: dict[str, TraefikRouting] = {}
    for name, svc in services.items():
        lb = (svc or {}).get("loadbalancer")
        if lb is None:
            continue  # weighted / mirroring services point at load balancers checked themselves
        try:
            r = TraefikRouting.from_load_balancer(lb, service=name)
        except ValueError as exc:
            report.error(f"Traefik service {name}: {exc}")
            continue
        if name in pinned and r.cookie_name is None:
            r = dataclasses.replace(
                r,
                cookie_name="(weighted)",
                cookie_http_only=True,
                cookie_same_site="lax",
                cookie_secure=False,
            )
        check_routing(r, f"Traefik service {name}", delay_ms, report, "the drain delay", paths)
        found[name] = r
    return found


def check_traefik_static(
    doc: Mapping[str, Any], file: str, out: list[Finding], proxies: list[StaticConfig]
) -> None:
    """Collect Traefik's static configuration (`proxies`) and warn if it phones home."""
    report = Reporter(file, out)
    proxies.append(static_from_doc(file, doc))
    g = lower_keys(doc).get("global") or {}
    for key in ("checknewversion", "sendanonymoususage"):
        if scalar(g.get(key, True)).lower() != "false":
            report.warning(f"global.{key} is not false: Traefik will contact the internet")
