"""`check-infra` for the blue/green model: weighted service, separate pools, sticky, metrics.

The model (infra/traefik/dynamic/, infra/traefik/compose/): `sf` and `sf-candidate` are separate
Traefik services; the production router points at a weighted service over the two, defined in a
file of the file provider; the sticky cookie sits on the weighted service; Traefik exposes
per-service Prometheus metrics, which `sf-lifecycle rollout` measures, on an internal entrypoint.
Each rule below exists because breaking it has a concrete cost:

- a candidate server inside the stable pool takes production traffic before anyone verified it;
- a router or a weighted child naming a service no file defines disables the weighted service,
  and every request on that router answers 404 (checked with the real binary);
- a weight that is not an integer >= 0, or all weights 0, leaves nothing to route to;
- without a cookie on the weighted service a client flips between versions on every request;
  a pool carrying a cookie of the same name fights it;
- without per-service metrics the rollout has nothing to judge; on a public entrypoint they
  leak the service inventory;
- a router straight to a weighted child (the candidate's verification router, say) adds its
  requests to that child's counters: verification traffic would hide production errors from
  the rollout gate and count towards `--min-requests`. It needs its own service, same servers.

Documents of the file provider are grouped by directory, as Traefik merges one watched directory.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ._infra_common import CANDIDATE_SUFFIX, Finding, lower_keys, scalar

__all__ = [
    "BlueGreenModel",
    "StaticConfig",
    "check_bluegreen",
    "static_from_doc",
    "static_from_flags",
    "verify_shares_child",
]


@dataclass(frozen=True, slots=True)
class StaticConfig:
    """What `check-infra` needs from Traefik's static configuration (a file or compose flags)."""

    file: str
    metrics_on: bool
    services_labels: bool
    metrics_entrypoint: str


def static_from_flags(file: str, flags: Sequence[str]) -> StaticConfig:
    """From a Traefik command line (`--metrics.prometheus.addServicesLabels=true`, ...)."""
    values: dict[str, str] = {}
    for flag in flags:
        key, _, value = flag.lstrip("-").partition("=")
        values[key.lower()] = value or "true"
    on = any(k.startswith("metrics.prometheus") for k in values) and (
        values.get("metrics.prometheus", "true").lower() != "false"
    )
    return StaticConfig(
        file,
        on,
        values.get("metrics.prometheus.addserviceslabels", "false").lower() == "true",
        values.get("metrics.prometheus.entrypoint", "traefik").lower(),
    )


def static_from_doc(file: str, doc: Mapping[str, Any]) -> StaticConfig:
    """From a static configuration file (`metrics: prometheus: ...`)."""
    prom = (lower_keys(doc).get("metrics") or {}).get("prometheus")
    on = prom is not None and prom is not False
    prom = prom if isinstance(prom, Mapping) else {}
    return StaticConfig(
        file,
        on,
        scalar(prom.get("addserviceslabels", False)).lower() == "true",
        str(prom.get("entrypoint", "traefik")).lower(),
    )


@dataclass
class BlueGreenModel:
    """What the rest of `check-infra` needs to know from the dynamic configuration.

    Attributes:
        pinned: Pools that are children of a weighted service with a sticky cookie (they need
            none of their own).
        server_hosts: Host names of every pool's servers (a compose service named there is
            routed by the file provider).
    """

    pinned: frozenset[str] = frozenset()
    server_hosts: frozenset[str] = frozenset()
    weighted: list[str] = field(default_factory=list)
    #: Children of weighted services (file provider): only their weighted service may route
    #: to them, or the rollout's per-service counters mix other traffic in.
    children: set[str] = field(default_factory=set)


def _base(name: str) -> tuple[str, str | None]:
    base, sep, provider = name.partition("@")
    return base, (provider if sep else None)


def _servers(svc: Mapping[str, Any]) -> set[str]:
    lb = svc.get("loadbalancer") or {}
    return {str(s.get("url", "")).rstrip("/") for s in lb.get("servers") or [] if s}


def check_bluegreen(
    dynamic: Sequence[tuple[str, Mapping[str, Any]]],
    statics: Sequence[StaticConfig],
    out: list[Finding],
) -> BlueGreenModel:
    """Check the weighted routing of each file-provider directory and the metrics it relies on."""
    groups: dict[Path, list[tuple[str, Mapping[str, Any]]]] = defaultdict(list)
    for file, doc in dynamic:
        groups[Path(file).parent].append((file, doc))
    model = BlueGreenModel()
    pinned: set[str] = set()
    hosts: set[str] = set()
    public: set[str] = set()
    for docs in groups.values():
        services: dict[str, tuple[str, Mapping[str, Any]]] = {}
        routers: dict[str, tuple[str, Mapping[str, Any]]] = {}
        for file, doc in docs:
            http = lower_keys(doc).get("http") or {}
            services.update({n: (file, s or {}) for n, s in (http.get("services") or {}).items()})
            routers.update({n: (file, r or {}) for n, r in (http.get("routers") or {}).items()})
        for _, svc in services.values():
            hosts |= {urlsplit(u).hostname or "" for u in _servers(svc)}
        for _, router in routers.values():
            public |= {str(e).lower() for e in router.get("entrypoints") or []}
        _check_group(services, routers, out, pinned, model)
        # A verification pool (same servers as a pinned child, e.g. sf-candidate-verify) serves
        # the same replicas: the child's version pin covers it, it needs no cookie of its own.
        child_servers = [_servers(services.get(c, _NONE)[1]) for c in pinned]
        for sname, (_, svc) in services.items():
            if svc.get("weighted") is None and _servers(svc) and _servers(svc) in child_servers:
                pinned.add(sname)
    model.pinned, model.server_hosts = frozenset(pinned), frozenset(hosts - {""})
    if model.weighted:
        _check_metrics(statics, public, out)
    return model


_NONE: tuple[str, Mapping[str, Any]] = ("", {})


def _check_group(
    services: Mapping[str, tuple[str, Mapping[str, Any]]],
    routers: Mapping[str, tuple[str, Mapping[str, Any]]],
    out: list[Finding],
    pinned: set[str],
    model: BlueGreenModel,
) -> None:
    def exists(ref: str) -> bool:
        base, provider = _base(ref.lower())
        return provider not in (None, "file") or base in services

    for name, (file, router) in routers.items():
        target = str(router.get("service", ""))
        if target and not exists(target):
            out.append(
                Finding(
                    "error",
                    file,
                    f"router {name} points at Traefik service {target}, which no file of this "
                    f"directory defines (the weights file is missing?): the router answers 404",
                )
            )
    weighted_children: set[frozenset[str]] = set()
    for name, (file, svc) in services.items():
        w = svc.get("weighted")
        if w is None:
            continue
        model.weighted.append(name)
        where = f"weighted service {name}"
        children = [c for c in (w.get("services") or []) if isinstance(c, Mapping)]
        weights: list[int] = []
        for child in children:
            ref = str(child.get("name", ""))
            raw = child.get("weight", 1)
            try:
                weight = int(str(raw))
            except ValueError:
                weight = -1
            if weight < 0 or isinstance(raw, bool):
                out.append(
                    Finding(
                        "error", file, f"{where}: weight of {ref} is {raw!r}, not an integer >= 0"
                    )
                )
            weights.append(max(weight, 0))
            if not ref or not exists(ref):
                out.append(
                    Finding(
                        "error",
                        file,
                        f"{where}: child {ref or '(no name)'} is not defined in this directory: "
                        f"Traefik disables {name} and every router on it answers 404",
                    )
                )
        if children and sum(weights) == 0:
            out.append(Finding("error", file, f"{where}: every weight is 0, nothing to route to"))
        local = [_base(str(c.get("name", "")).lower())[0] for c in children]
        weighted_children.add(frozenset(local))
        model.children.update(
            b
            for b, p in (_base(str(c.get("name", "")).lower()) for c in children)
            if p in (None, "file")
        )
        for rname, (rfile, router) in routers.items():
            rbase, rprov = _base(str(router.get("service", "")).lower())
            if rprov in (None, "file") and rbase in local:
                out.append(verify_shares_child(rfile, f"router {rname}", rbase, name))
        cookie = ((w.get("sticky") or {}).get("cookie")) if w.get("sticky") else None
        if cookie is None:
            out.append(
                Finding(
                    "warning",
                    file,
                    f"{where}: no sticky cookie; during a rollout a client would flip between "
                    f"versions on every request. Add sticky.cookie (name sf-aff, httpOnly, "
                    f"sameSite lax) to the weighted service",
                )
            )
        else:
            pinned.update(local)
            cname = str((cookie or {}).get("name", ""))
            for pool in local:
                lb = (services.get(pool, _NONE)[1].get("loadbalancer")) or {}
                child_cookie = ((lb.get("sticky") or {}).get("cookie")) or {}
                if cname and str(child_cookie.get("name", "")) == cname:
                    out.append(
                        Finding(
                            "error",
                            file,
                            f"{where}: pool {pool} sets the same sticky cookie {cname} as the "
                            f"weighted service; the two fight over it. Remove it from the pool",
                        )
                    )
        stable = [c for c in local if not c.endswith(CANDIDATE_SUFFIX)]
        for cand in (c for c in local if c.endswith(CANDIDATE_SUFFIX)):
            cand_servers = _servers(services.get(cand, _NONE)[1])
            for s in stable:
                both = cand_servers & _servers(services.get(s, _NONE)[1])
                if both:
                    out.append(
                        Finding(
                            "error",
                            file,
                            f"{where}: candidate server(s) {', '.join(sorted(both))} are also in "
                            f"the stable pool {s}: they take production traffic before the "
                            f"candidate is verified and promoted",
                        )
                    )
    for name, (file, _) in services.items():
        if not name.endswith(CANDIDATE_SUFFIX):
            continue
        stable_name = name.removesuffix(CANDIDATE_SUFFIX)
        if stable_name in services and not any({name, stable_name} <= c for c in weighted_children):
            out.append(
                Finding(
                    "error",
                    file,
                    f"pools {stable_name} and {name} exist but no weighted service spans them "
                    f"(the weights file is missing?): the candidate cannot be promoted gradually",
                )
            )


def verify_shares_child(file: str, router: str, child: str, weighted: str) -> Finding:
    """The finding for a router that reaches a weighted child directly."""
    return Finding(
        "error",
        file,
        f"{router} points at {child}, a child of weighted service {weighted}: its requests "
        f"count in {child}'s metrics with production traffic, hiding errors from `sf-lifecycle "
        f"rollout` and counting towards --min-requests. Point it at its own service with the "
        f"same servers (e.g. {child}-verify)",
    )


def _check_metrics(statics: Sequence[StaticConfig], public: set[str], out: list[Finding]) -> None:
    for s in statics:
        if not s.metrics_on or not s.services_labels:
            missing = "metrics are off" if not s.metrics_on else "addServicesLabels is off"
            out.append(
                Finding(
                    "error",
                    s.file,
                    f"Traefik's Prometheus {missing}: `sf-lifecycle rollout` judges each step on "
                    f"per-service metrics. Enable metrics.prometheus with addServicesLabels=true "
                    f"on the internal entrypoint",
                )
            )
        elif s.metrics_entrypoint in public:
            out.append(
                Finding(
                    "error",
                    s.file,
                    f"Traefik's metrics are on entrypoint {s.metrics_entrypoint}, which serves "
                    f"routers: they would be public. Put them on the internal entrypoint",
                )
            )
