"""How Traefik routes to the sf pools: the one model of the routing, written and read back.

`TraefikRouting` is what `infra/traefik/dynamic/` and the compose labels say: the health check
Traefik polls (path, interval, timeout), the sticky cookie, and for blue/green the weighted
service, the candidate's pool and its verification router. Two users share it:

- the test harness (`sf_lifecycle.testing.TraefikProxy`) renders it into the file-provider
  documents it serves, and a unit test compares the rendering with the files in `infra/`;
- `check-infra` reads each Traefik service of a deployment into it (`from_load_balancer`), from a
  file-provider document or from compose labels, and judges the drain-relevant fields
  (`drain_fields`) against the library's timings.

Reading follows Traefik: keys in any case (`healthCheck` == `healthcheck`), and Traefik's own
defaults where a value is absent (a health check every 30 s, timeout 5 s). An absent health check
or sticky cookie reads as None, which the harness never renders and `check-infra` reports.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._infra_common import (
    HEALTH_PATH,
    TRAEFIK_INTERVAL,
    TRAEFIK_TIMEOUT,
    fmt_ms,
    lower_keys,
    parse_duration_ms,
    scalar,
)

__all__ = ["TraefikRouting"]

#: `cookie_name` of a sticky cookie without a name: Traefik generates one.
GENERATED_COOKIE = ""


def _cookie_fields(cookie: object) -> dict[str, Any]:
    """The `cookie_*` fields of a `sticky.cookie` table (lower-cased keys), None when absent."""
    if cookie is None:
        return {
            "cookie_name": None,
            "cookie_http_only": False,
            "cookie_same_site": None,
            "cookie_secure": False,
        }
    if not isinstance(cookie, Mapping):
        cookie = {}  # `sticky.cookie=true` in labels: a cookie with Traefik's defaults
    return {
        "cookie_name": str(cookie.get("name", "")) or GENERATED_COOKIE,
        "cookie_http_only": scalar(cookie.get("httponly", False)).lower() == "true",
        "cookie_same_site": str(cookie["samesite"]).lower() if cookie.get("samesite") else None,
        "cookie_secure": scalar(cookie.get("secure", False)).lower() == "true",
    }


@dataclass(frozen=True, slots=True)
class TraefikRouting:
    """How Traefik routes to the sf pool; the single definition the infra files are checked against.

    Args:
        service: Name of the Traefik service (the pool) and of its router.
        rule: The router rule. The compose file uses `Host(...)` instead; the rule is not part of
            the drain semantics, so the cross-checks do not compare it.
        entrypoint: Entrypoint the router listens on.
        health_path: What Traefik polls; 503 there takes the replica out of the pool. None: no
            health check (read from a file that has none; `check-infra` reports it).
        health_interval: Go duration between two probes. Interval plus timeout must fit inside
            the drain delay (`SF_DRAIN_DELAY_MS`, 5 s by default).
        health_timeout: Go duration after which a probe counts as failed.
        cookie_name: The sticky-session cookie; None: no sticky cookie, `""`: Traefik generates
            the name.
        cookie_http_only: Keep the cookie away from page scripts.
        cookie_same_site: `lax`, `strict` or `none`; None: not set.
        cookie_secure: Send the cookie over HTTPS only (turn on together with TLS).
        weighted_service: Blue/green: the weighted service the production router points at;
            its children are `service` (stable) and `candidate_service`. The sticky cookie sits
            on it, so a pinned client stays on its version during a rollout.
        candidate_service: Blue/green: the candidate's own pool (weight 0 until promoted).
        candidate_rule: Blue/green: the router that reaches the candidate directly, to verify
            it before it takes production traffic. It points at `verify_service`, never at
            the weighted child, so verification requests stay out of the rollout's counters.
        candidate_allow: Source ranges allowed through the candidate's router.
    """

    service: str = "sf"
    rule: str = "PathPrefix(`/`)"
    entrypoint: str = "web"
    health_path: str | None = HEALTH_PATH
    health_interval: str = "2s"
    health_timeout: str = "1s"
    cookie_name: str | None = "sf-aff"
    cookie_http_only: bool = True
    cookie_same_site: str | None = "lax"
    cookie_secure: bool = False
    weighted_service: str = "sf-weighted"
    candidate_service: str = "sf-candidate"
    candidate_rule: str = "Host(`candidate.sf.localhost`)"
    candidate_allow: tuple[str, ...] = ("127.0.0.1/32", "::1/128")

    # -- reading -------------------------------------------------------------------------------
    @classmethod
    def from_load_balancer(cls, lb: Mapping[str, Any] | None, **fields: Any) -> TraefikRouting:
        """The health check and sticky cookie of one Traefik `loadBalancer` table.

        Args:
            lb: The table, from a file-provider document or the tree of compose labels; keys in
                any case. None reads as a service with neither.
            **fields: The other fields (`service`, ...), passed on as they are.

        Raises:
            ValueError: an interval or timeout that is not a Go duration.
        """
        lb = lower_keys(lb or {})
        hc = lb.get("healthcheck") or {}
        sticky = lb.get("sticky")
        interval = str(hc.get("interval", TRAEFIK_INTERVAL))
        timeout = str(hc.get("timeout", TRAEFIK_TIMEOUT))
        for duration in (interval, timeout):
            parse_duration_ms(duration)  # a bad value raises here, not when it is judged
        return cls(
            **fields,
            health_path=str(hc["path"]) if hc.get("path") else None,
            health_interval=interval,
            health_timeout=timeout,
            **_cookie_fields(sticky.get("cookie") if sticky else None),
        )

    @classmethod
    def from_dynamic_config(cls, doc: Mapping[str, Any], service: str = "sf") -> TraefikRouting:
        """Read the routing back from a file-provider document (e.g. `infra/traefik/dynamic`).

        Raises:
            KeyError: the document has no such service or router.
            ValueError: an interval or timeout that is not a Go duration.
        """
        http = doc["http"]
        router = http["routers"][service]
        defaults = cls()
        target = http["services"].get(router.get("service", service), {})
        blue_green: dict[str, Any] = {}
        if "weighted" in target:
            # Blue/green: the cookie sits on the weighted service, the candidate has a router.
            names = [c["name"] for c in target["weighted"]["services"]]
            candidate = next(n for n in names if n != service)
            c_router = http["routers"][candidate]
            allow = http["middlewares"][c_router["middlewares"][0]]["ipAllowList"]
            sticky = lower_keys(target["weighted"].get("sticky") or {})
            blue_green = {
                "weighted_service": router["service"],
                "candidate_service": candidate,
                "candidate_rule": c_router["rule"],
                "candidate_allow": tuple(allow["sourceRange"]),
                **_cookie_fields(sticky.get("cookie")),
            }
        pool = cls.from_load_balancer(
            http["services"][service]["loadBalancer"],
            service=service,
            rule=router.get("rule", defaults.rule),
            entrypoint=(router.get("entryPoints") or [defaults.entrypoint])[0],
        )
        return dataclasses.replace(pool, **blue_green)

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], service: str = "sf") -> TraefikRouting:
        """`from_dynamic_config` of a YAML file, or of every `*.yaml` file in a directory merged
        as Traefik's file provider merges them (e.g. `infra/traefik/dynamic`)."""
        p = Path(path)
        files = sorted(p.glob("*.yaml")) if p.is_dir() else [p]
        merged: dict[str, Any] = {}
        for file in files:
            doc = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
            for section, tables in (doc.get("http") or {}).items():
                for name, value in tables.items():
                    merged.setdefault("http", {}).setdefault(section, {})[name] = value
        return cls.from_dynamic_config(merged, service)

    # -- judging -------------------------------------------------------------------------------
    @property
    def health_interval_ms(self) -> float:
        return parse_duration_ms(self.health_interval)

    @property
    def health_timeout_ms(self) -> float:
        return parse_duration_ms(self.health_timeout)

    def drain_fields(self) -> dict[str, object]:
        """What matters for draining, as `check-infra` shows it: labels and files must agree."""
        name = self.cookie_name
        return {
            "health check path": self.health_path,
            "health check interval": fmt_ms(self.health_interval_ms),
            "health check timeout": fmt_ms(self.health_timeout_ms),
            "sticky cookie name": "(generated)" if name == GENERATED_COOKIE else name,
            "sticky cookie httpOnly": self.cookie_http_only,
            "sticky cookie sameSite": self.cookie_same_site,
            "sticky cookie secure": self.cookie_secure,
        }

    # -- writing -------------------------------------------------------------------------------
    @property
    def verify_service(self) -> str:
        """Blue/green: the service of the candidate's verification router (same servers as
        `candidate_service`, its own metrics)."""
        return f"{self.candidate_service}-verify"

    def _sticky(self) -> dict[str, Any]:
        if self.cookie_name is None:
            return {}
        cookie: dict[str, Any] = {"name": self.cookie_name, "httpOnly": self.cookie_http_only}
        if self.cookie_same_site is not None:
            cookie["sameSite"] = self.cookie_same_site
        if self.cookie_secure:
            cookie["secure"] = True
        return {"sticky": {"cookie": cookie}}

    def _load_balancer(self, servers: Sequence[str]) -> dict[str, Any]:
        lb: dict[str, Any] = {"servers": [{"url": url.rstrip("/")} for url in servers]}
        if self.health_path is not None:
            lb["healthCheck"] = {
                "path": self.health_path,
                "interval": self.health_interval,
                "timeout": self.health_timeout,
            }
        return lb

    def bluegreen_config(self, stable: Sequence[str], candidate: Sequence[str]) -> dict[str, Any]:
        """The blue/green routing file (`infra/traefik/dynamic/sf.yaml`): pools and two routers.

        The production router points at `weighted_service` (defined in the weights file, see
        `weights_config`); the candidate router reaches the candidate's servers through their
        own service `verify_service`, from `candidate_allow` only: Traefik counts metrics per
        service, and the rollout judges the weighted child on production traffic alone.
        Neither pool has a sticky cookie of its own: the weighted service's cookie pins a
        client to a version (a second cookie of the same name on a pool would fight it).
        """
        allow = f"{self.candidate_service}-allow"
        return {
            "http": {
                "routers": {
                    self.service: {
                        "rule": self.rule,
                        "entryPoints": [self.entrypoint],
                        "service": self.weighted_service,
                    },
                    self.candidate_service: {
                        "rule": self.candidate_rule,
                        "entryPoints": [self.entrypoint],
                        "service": self.verify_service,
                        "middlewares": [allow],
                        "priority": 1000,
                    },
                },
                "middlewares": {
                    allow: {"ipAllowList": {"sourceRange": list(self.candidate_allow)}}
                },
                "services": {
                    self.service: {"loadBalancer": self._load_balancer(stable)},
                    self.candidate_service: {"loadBalancer": self._load_balancer(candidate)},
                    self.verify_service: {"loadBalancer": self._load_balancer(candidate)},
                },
            }
        }

    def weights_config(self, stable: int = 100, candidate: int = 0) -> dict[str, Any]:
        """The weights file (`infra/traefik/dynamic/weights.yaml`) that `rollout` rewrites."""
        return {
            "http": {
                "services": {
                    self.weighted_service: {
                        "weighted": {
                            "services": [
                                {"name": self.service, "weight": stable},
                                {"name": self.candidate_service, "weight": candidate},
                            ],
                            **self._sticky(),
                            # Skip a child whose servers are all DOWN.
                            "healthCheck": {},
                        }
                    }
                }
            }
        }

    def dynamic_config(self, servers: Sequence[str]) -> dict[str, Any]:
        """The file-provider document routing every request to `servers` (base URLs).

        With no servers the router and service are left out: Traefik rejects an empty pool, and
        an absent router answers 404, which a test can tell apart from a 502 or 503.
        """
        if not servers:
            return {}
        return {
            "http": {
                "routers": {
                    self.service: {
                        "rule": self.rule,
                        "entryPoints": [self.entrypoint],
                        "service": self.service,
                    }
                },
                "services": {
                    self.service: {
                        "loadBalancer": {**self._load_balancer(servers), **self._sticky()}
                    }
                },
            }
        }
