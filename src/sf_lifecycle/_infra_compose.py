"""`check-infra` for docker compose: stop timeout, stop signal, Traefik labels, shared pools.

Each sf replica is a compose service with `SF_*` settings or Traefik labels. Docker SIGKILLs a
container `stop_grace_period` after SIGTERM (10 s when absent), so that must outlast the grace
budget; Traefik's Docker provider drops a service whose containers label it differently, so the
replicas of a pool must agree label for label; and a candidate must never join the stable pool.
The labels are read into the same routing model as the file provider (`TraefikRouting`), and
`check_against_file_provider` compares the two when both are part of the set checked.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import PurePath
from typing import Any

from ._infra_bluegreen import BlueGreenModel, StaticConfig, static_from_flags, verify_shares_child
from ._infra_common import (
    CANDIDATE_SUFFIX,
    COMPOSE_STOP_MS,
    DELAY_VAR,
    GRACE_VAR,
    Finding,
    HealthPaths,
    Reporter,
    as_dict,
    ceil_s,
    interpolate,
    parse_duration_ms,
    read_budget,
    scalar,
)
from ._infra_traefik import check_routing, label_tree
from ._traefik_routing import TraefikRouting

__all__ = [
    "ComposeService",
    "check_against_file_provider",
    "check_compose",
    "check_label_routers",
    "compose_base",
    "merge_compose",
    "raw_mapping",
]


@dataclass
class ComposeService:
    """One sf replica of a compose file: its settings and its Traefik labels."""

    name: str
    file: str
    env: dict[str, str]
    labels: dict[str, str]
    tree: dict[str, Any]
    routed: bool = True
    hosts: frozenset[str] = frozenset()

    @property
    def pools(self) -> set[str]:
        services = self.tree.get("http", {}).get("services", {})
        return set(services) if isinstance(services, dict) else set()

    def routing(self, pool: str) -> TraefikRouting:
        """The routing its labels give Traefik service `pool`.

        Raises:
            ValueError: an interval or timeout that is not a Go duration.
        """
        lb = self.tree["http"]["services"][pool].get("loadbalancer", {})
        return TraefikRouting.from_load_balancer(lb, service=pool)


def check_compose(
    doc: Mapping[str, Any],
    file: str,
    env: Mapping[str, str],
    out: list[Finding],
    proxies: list[StaticConfig],
) -> list[ComposeService]:
    """Check one compose file; return its sf replicas and add its Traefik to `proxies`."""
    report = Reporter(file, out)
    services = doc.get("services") or {}
    apps: list[ComposeService] = []
    for name, svc in services.items():
        if not isinstance(svc, Mapping):
            continue
        if "traefik" in str(svc.get("image", "")).lower():
            command = svc.get("command") or []
            if isinstance(command, str):
                command = command.split()
            proxies.append(static_from_flags(file, [interpolate(str(c), env) for c in command]))
            continue  # the proxy, not an sf replica
        svc_env = as_dict(svc.get("environment"), env)
        labels = as_dict(svc.get("labels"), env)
        labels.update(as_dict((svc.get("deploy") or {}).get("labels"), env))
        tree = label_tree(labels)
        # With exposedByDefault=false only `traefik.enable=true` routes; any http label
        # shows the intent too. `traefik.enable=false` always wins.
        enable = scalar(tree.get("enable", "")).lower()
        routed = enable != "false" and (enable == "true" or "http" in tree)
        if not routed and not any(k.startswith("SF_") for k in svc_env):
            continue  # not an sf replica (Traefik itself, a database, ...)
        hosts = frozenset({str(name), str(svc.get("container_name", name))})
        app = ComposeService(str(name), file, svc_env, labels, tree, routed, hosts)
        apps.append(app)
        _check_service(app, svc, env, report)
    _check_pools(apps, report)
    return apps


def _check_service(
    app: ComposeService, svc: Mapping[str, Any], env: Mapping[str, str], report: Reporter
) -> None:
    where = f"service {app.name}"
    budget = read_budget(app.env)
    for problem in budget.problems:
        report.error(f"{where}: {problem}")
    raw_stop = svc.get("stop_grace_period")
    try:
        stop_ms = (
            COMPOSE_STOP_MS
            if raw_stop is None
            else parse_duration_ms(interpolate(str(raw_stop), env))
        )
    except ValueError as exc:
        report.error(f"{where}: stop_grace_period: {exc}")
    else:
        if stop_ms < budget.required_ms:
            shown = "absent (Docker's default 10 s)" if raw_stop is None else f"{raw_stop}"
            report.error(
                f"{where}: stop_grace_period {shown} is shorter than {budget.describe()}: "
                f"Docker would SIGKILL the replica while it still drains. Set "
                f"stop_grace_period: {ceil_s(budget.required_ms)}s or more."
            )
    signal_name = str(svc.get("stop_signal", "SIGTERM")).upper()
    if signal_name not in ("SIGTERM", "TERM", "15"):
        report.error(
            f"{where}: stop_signal {signal_name}; the server drains on SIGTERM (SIGINT skips "
            f"the drain delay). Remove stop_signal or set it to SIGTERM."
        )
    if (
        app.env.get("SF_DRAIN_AFTER_PROBES")
        and (svc.get("healthcheck") or {}).get("disable") is not True
    ):
        report.warning(
            f"{where}: SF_DRAIN_AFTER_PROBES counts every 503 probe of "
            f"{HealthPaths.from_env(app.env).healthz}, also "
            f"Docker's own healthcheck (compose or image HEALTHCHECK), which can end the "
            f"drain delay before Traefik has looked. Unset it, or disable Docker's healthcheck."
        )
    if not app.routed:
        return  # fine if a file-provider pool names it; see check_against_file_provider
    routers = (app.tree.get("http") or {}).get("routers") or {}
    elsewhere = bool(routers) and all(
        "@" in str((r or {}).get("service", "")) for r in routers.values()
    )
    if not app.pools and not elsewhere:
        report.error(
            f"{where}: routed by Traefik without traefik.http.services.<name>.loadbalancer "
            f"labels, so without a health check. Add the healthcheck and sticky labels."
        )
    for pool in sorted(app.pools):
        try:
            r = app.routing(pool)
        except ValueError as exc:
            report.error(f"{where}: Traefik service {pool}: {exc}")
            continue
        check_routing(
            r,
            f"{where}, Traefik service {pool}",
            budget.delay_ms,
            report,
            DELAY_VAR,
            HealthPaths.from_env(app.env),
        )


def _check_pools(apps: Sequence[ComposeService], report: Reporter) -> None:
    by_name = {a.name: a for a in apps}
    for a in apps:
        base = a.name.removesuffix(CANDIDATE_SUFFIX)
        shared = a.pools & by_name[base].pools if base != a.name and base in by_name else set()
        if shared:
            report.error(
                f"service {a.name} joins the stable pool {sorted(shared)[0]} of {base}: the "
                f"candidate would take production traffic the moment Docker calls it healthy, "
                f"before anyone verified it. Give it its own Traefik service and route "
                f"production through a weighted service (see infra/traefik/compose/)."
            )
    seen: set[tuple[str, str]] = set()
    for a in apps:
        for b in apps:
            if a.name >= b.name or not (a.pools & b.pools) or (a.name, b.name) in seen:
                continue
            seen.add((a.name, b.name))
            la = {k.lower(): v for k, v in a.labels.items() if k.lower().startswith("traefik.")}
            lb = {k.lower(): v for k, v in b.labels.items() if k.lower().startswith("traefik.")}
            for key in sorted(la.keys() | lb.keys()):
                if la.get(key) != lb.get(key):
                    report.error(
                        f"services {a.name} and {b.name} share Traefik service "
                        f"{sorted(a.pools & b.pools)[0]} but label {key} differs "
                        f"({la.get(key, '(absent)')!r} vs {lb.get(key, '(absent)')!r}): Traefik's "
                        f"Docker provider drops a service defined differently by its containers."
                    )
            for var in (GRACE_VAR, DELAY_VAR, "SF_STATE_DIR"):
                if a.env.get(var) != b.env.get(var):
                    report.warning(
                        f"services {a.name} and {b.name} share a pool but {var} differs "
                        f"({a.env.get(var)!r} vs {b.env.get(var)!r})"
                    )


def check_label_routers(
    apps: Sequence[ComposeService], model: BlueGreenModel, out: list[Finding]
) -> None:
    """Label routers that reach a weighted child of the file provider; replicas nobody routes."""
    for app in apps:
        for rname, router in ((app.tree.get("http") or {}).get("routers") or {}).items():
            base, _, provider = str((router or {}).get("service", "")).lower().partition("@")
            if provider == "file" and base in model.children:
                out.append(
                    verify_shares_child(app.file, f"label router {rname}", base, "(weights file)")
                )
    for app in apps:
        if not app.routed and not (app.hosts & model.server_hosts):
            out.append(
                Finding(
                    "warning",
                    app.file,
                    f"service {app.name}: has SF_* settings but no Traefik labels "
                    f"(traefik.enable), and no file-provider pool in the files checked names it",
                )
            )


def check_against_file_provider(
    file: str,
    routings: Mapping[str, TraefikRouting],
    apps: Sequence[ComposeService],
    out: list[Finding],
) -> None:
    """A pool defined both in a file-provider document and in compose labels: they must agree."""
    for pool, r in routings.items():
        for app in apps:
            if pool not in app.pools:
                continue
            try:
                theirs = app.routing(pool).drain_fields()
            except ValueError:
                continue
            for key, value in r.drain_fields().items():
                if theirs[key] != value:
                    out.append(
                        Finding(
                            "error",
                            file,
                            f"Traefik service {pool}: {key} is {value!r} here but "
                            f"{theirs[key]!r} in the labels of service {app.name} "
                            f"({app.file}); the file provider and compose must agree",
                        )
                    )


# -- shape ------------------------------------------------------------------------------------
_STR = (str,)
_SCALAR = (str, int, float)
_SEQ_OR_MAP = (list, Mapping)
#: The keys of a service the checks read, and the YAML types compose allows for them.
_SERVICE_KEYS: dict[str, tuple[type, ...]] = {
    "image": _STR,
    "container_name": _STR,
    "hostname": _STR,
    "environment": _SEQ_OR_MAP,
    "labels": _SEQ_OR_MAP,
    "depends_on": _SEQ_OR_MAP,
    "command": (str, list),
    "entrypoint": (str, list),
    "healthcheck": (Mapping,),
    "volumes": (list,),
    "deploy": (Mapping,),
    "stop_grace_period": _SCALAR,
    "stop_signal": _SCALAR,
}


def _type_name(value: object) -> str:
    if isinstance(value, Mapping):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:60]


def compose_problems(doc: Mapping[str, Any]) -> list[str]:
    """What in `doc`'s structure compose itself would refuse, for the keys the checks read.

    A file with such a problem is reported and not checked further (nor merged, for an
    overlay): every check can then rely on the types compose guarantees.
    """
    services = doc.get("services")
    if services is None:
        return []
    if not isinstance(services, Mapping):
        return [f"services: is {_type_name(services)}; compose needs a mapping of service names"]
    problems = []
    for name, svc in services.items():
        where = f"service {name}"
        if svc is None:
            continue
        if not isinstance(svc, Mapping):
            problems.append(f"{where}: is {_type_name(svc)}; compose needs a mapping")
            continue
        for key, types in _SERVICE_KEYS.items():
            value = svc.get(key)
            if value is not None and (not isinstance(value, types) or isinstance(value, bool)):
                problems.append(f"{where}: {key}: {_type_name(value)} is not allowed here")
        for key in ("environment", "labels"):
            problems += _mapping_problems(where, key, svc.get(key))
        deploy = svc.get("deploy")
        if isinstance(deploy, Mapping):
            labels = deploy.get("labels")
            if labels is not None and not isinstance(labels, _SEQ_OR_MAP):
                problems.append(f"{where}: deploy.labels: {_type_name(labels)} is not allowed")
            problems += _mapping_problems(where, "deploy.labels", labels)
        health = svc.get("healthcheck")
        if isinstance(health, Mapping):
            test = health.get("test")
            if test is not None and not isinstance(test, (str, list)):
                problems.append(f"{where}: healthcheck.test: {_type_name(test)} is not allowed")
        volumes, command = svc.get("volumes"), svc.get("command")
        for item in volumes if isinstance(volumes, list) else []:
            if not isinstance(item, (str, Mapping)):
                problems.append(f"{where}: volumes: {_type_name(item)} is not a volume")
        for item in command if isinstance(command, list) else []:
            if isinstance(item, (Mapping, list)):
                problems.append(f"{where}: command: {_type_name(item)} is not an argument")
    return problems


def _mapping_problems(where: str, key: str, value: object) -> list[str]:
    """`environment`/`labels`: values are scalars (or null), list items `KEY=VALUE` strings."""
    if isinstance(value, Mapping):
        bad = [k for k, v in value.items() if isinstance(v, (Mapping, list))]
        return [f"{where}: {key}: {k} is {_type_name(value[k])}, not a value" for k in bad]
    if isinstance(value, list):
        bad_items = [v for v in value if not isinstance(v, str)]
        return [f"{where}: {key}: {_type_name(v)} is not a KEY=VALUE string" for v in bad_items]
    return []


# -- overlays ---------------------------------------------------------------------------------
_OVERLAY = re.compile(r"((?:docker-)?compose)\.[^.]+\.(ya?ml)")


def compose_base(file: str) -> str | None:
    """The base file an overlay such as `docker-compose.multihost.yaml` is merged onto.

    `docker compose -f docker-compose.yaml -f docker-compose.X.yaml` is how an overlay is used,
    and what `check-infra` checks: the base alone, and the base with each overlay merged in.
    """
    m = _OVERLAY.fullmatch(PurePath(file).name)
    return str(PurePath(file).with_name(f"{m.group(1)}.{m.group(2)}")) if m else None


def raw_mapping(value: object) -> dict[str, object]:
    """Compose `environment`/`labels` as a mapping, values NOT interpolated (`KEY=VALUE` lists
    too)."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, list):
        return dict(str(item).partition("=")[::2] for item in value)
    return {}


def _depends_mapping(value: object) -> dict[str, object]:
    if isinstance(value, list):
        return {str(v): {"condition": "service_started"} for v in value}
    return dict(value) if isinstance(value, Mapping) else {}


def _target(volume: object) -> str:
    if isinstance(volume, Mapping):
        return str(volume.get("target", ""))
    parts = str(volume).split(":")
    return parts[1] if len(parts) > 1 else parts[0]


def _deep_merge(old: object, new: object) -> object:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        merged = dict(old)
        for k, v in new.items():
            merged[k] = _deep_merge(old.get(k), v)
        return merged
    if isinstance(old, list) and isinstance(new, list):
        return old + [v for v in new if v not in old]
    return copy.deepcopy(new)


def _merge_service(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        old = out.get(key)
        if key in ("environment", "labels"):
            out[key] = {**raw_mapping(old), **raw_mapping(value)}
        elif key == "depends_on":
            out[key] = {**_depends_mapping(old), **_depends_mapping(value)}
        elif key == "volumes" and isinstance(old, list) and isinstance(value, list):
            by_target = {_target(v): v for v in old}  # a mount of the same target replaces
            by_target.update({_target(v): v for v in value})
            out[key] = list(by_target.values())
        elif key == "healthcheck" and isinstance(old, Mapping) and isinstance(value, Mapping):
            out[key] = {**old, **value}
        elif key in ("command", "entrypoint"):
            out[key] = copy.deepcopy(value)
        else:
            out[key] = _deep_merge(old, value)
    return out


def merge_compose(base: Mapping[str, Any], overlay: Mapping[str, Any]) -> dict[str, Any]:
    """`overlay` merged onto `base` as `docker compose -f base -f overlay` does: mappings merge,
    `environment`/`labels`/`depends_on` merge by key, `volumes` by target, `command` and
    `entrypoint` are replaced, other lists are appended to."""
    out = copy.deepcopy(dict(base))
    for key, value in overlay.items():
        if key == "services" and isinstance(value, Mapping):
            services = dict(out.get("services") or {})
            for name, svc in value.items():
                services[name] = _merge_service(services.get(name) or {}, svc or {})
            out["services"] = services
        else:
            out[key] = _deep_merge(out.get(key), value)
    return out
