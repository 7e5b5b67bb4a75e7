"""Cross-checks of deployment files against the library's shutdown timings: `check-infra`.

A zero-downtime upgrade depends on numbers spread over several files that nothing else compares:
the orchestrator's kill timeout must outlast the grace budget plus the drain delay, the proxy's
health probe must notice the 503 inside the drain delay, and every replica of a pool must carry
the same proxy labels (Traefik's Docker provider drops a service whose containers disagree). Each
file can be valid on its own and the set still drop requests or SIGKILL a queue drain. This
module reads docker-compose files, Kubernetes manifests and Traefik file-provider configuration
and reports each mismatch as a `Finding`:

- `error`: unsafe. Requests will fail or writes be cut off during an upgrade. Exit code 1.
- `warning`: likely a mistake, or safe only under conditions the files cannot show.

Values are read as the deployment would see them: `${VAR:-default}` resolves to the default
unless `--env VAR=value` is given (the process environment is deliberately not read, so the
result does not depend on the shell that runs the check), and a missing `SF_*` variable takes the
library's default from `Settings`.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .config import Settings

__all__ = ["COMMAND", "Finding", "check_documents", "check_paths", "parse_duration_ms"]

Severity = Literal["error", "warning"]

_DEFAULTS = Settings()
GRACE_VAR, DELAY_VAR = "SF_RPC_SHUTDOWN_GRACE_MS", "SF_DRAIN_DELAY_MS"
HEALTH_PATH = "/api/healthz"
#: Traefik's defaults when a health check omits them.
_TRAEFIK_INTERVAL_MS, _TRAEFIK_TIMEOUT_MS = 30_000, 5_000
#: Docker's default stop timeout when `stop_grace_period` is absent.
_COMPOSE_STOP_MS = 10_000
_WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job", "Pod"}


@dataclass(frozen=True, slots=True)
class Finding:
    """One problem found in one file.

    Attributes:
        severity: `error` (unsafe: exit non-zero) or `warning`.
        file: The file, as given on the command line or found in a directory.
        message: What is wrong and how to fix it.
    """

    severity: Severity
    file: str
    message: str

    def __str__(self) -> str:
        return f"{self.severity.upper():7} {self.file}: {self.message}"


# -- values -----------------------------------------------------------------------------------
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_MS = {"ns": 1e-6, "us": 1e-3, "µs": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_duration_ms(value: object) -> float:
    """Milliseconds of a Go/Compose duration (`610s`, `1m30s`, `500ms`); a bare number is seconds.

    Raises:
        ValueError: not a duration.
    """
    if isinstance(value, bool):
        raise ValueError(f"not a duration: {value!r}")
    if isinstance(value, int | float):
        return float(value) * 1000
    text = str(value).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text) * 1000
    pos, total = 0, 0.0
    for m in _DURATION.finditer(text):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_MS[m.group(2)]
        pos = m.end()
    if pos != len(text) or not text:
        raise ValueError(f"not a duration: {value!r} (expected e.g. 610s, 1m30s, 500ms)")
    return total


def _fmt_ms(ms: float) -> str:
    return f"{ms / 1000:g} s"


_VAR = re.compile(r"\$(?:\$|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])([^}]*))?\}|([A-Za-z_]\w*))")


def interpolate(value: str, env: Mapping[str, str]) -> str:
    """Resolve Compose-style `${VAR}`, `${VAR:-default}`, `${VAR-default}` and `$VAR` in `value`."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        name = m.group(1) or m.group(4)
        op, arg = m.group(2), m.group(3) or ""
        current = env.get(name)
        if op in (":-", ":?"):
            return current if current else (arg if op == ":-" else "")
        if op in ("-", "?"):
            return current if current is not None else (arg if op == "-" else "")
        if op in (":+", "+"):
            return arg if (current if op == ":+" else current is not None) else ""
        return current or ""

    return _VAR.sub(sub, value)


def _as_dict(value: object, env: Mapping[str, str]) -> dict[str, str]:
    """Compose `environment`/`labels`, as a mapping or a `KEY=VALUE` list, interpolated."""
    pairs: list[tuple[object, object]] = []
    if isinstance(value, Mapping):
        pairs = list(value.items())
    elif isinstance(value, list):
        for item in value:
            key, _, val = str(item).partition("=")
            pairs.append((key, val))
    return {str(k): interpolate("" if v is None else _scalar(v), env) for k, v in pairs}


def _scalar(v: object) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


def _lower_keys(obj: Any) -> Any:
    # Traefik reads its configuration case-insensitively (`healthCheck` == `healthcheck`).
    if isinstance(obj, Mapping):
        return {str(k).lower(): _lower_keys(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_lower_keys(v) for v in obj]
    return obj


@dataclass
class _Budget:
    grace_ms: int
    delay_ms: int
    problems: list[str] = field(default_factory=list)

    @property
    def required_ms(self) -> int:
        return self.grace_ms + self.delay_ms

    def describe(self) -> str:
        return (
            f"{GRACE_VAR} ({self.grace_ms} ms) + {DELAY_VAR} ({self.delay_ms} ms) "
            f"= {_fmt_ms(self.required_ms)}"
        )


def _budget(env: Mapping[str, str]) -> _Budget:
    values = {GRACE_VAR: _DEFAULTS.grace_ms, DELAY_VAR: _DEFAULTS.drain_delay_ms}
    problems: list[str] = []
    for var in values:
        raw = env.get(var, "").strip()
        if not raw:
            continue
        try:
            values[var] = int(raw)
        except ValueError:
            problems.append(f"{var}={raw!r} is not an integer number of milliseconds")
    return _Budget(values[GRACE_VAR], values[DELAY_VAR], problems)


# -- routing (Traefik) ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class _Routing:
    """What matters for draining in one Traefik service, from labels or from a file."""

    health_path: str | None
    interval_ms: float
    timeout_ms: float
    cookie_name: str | None
    cookie_http_only: bool
    cookie_same_site: str | None
    cookie_secure: bool

    def fields(self) -> dict[str, object]:
        return {
            "health check path": self.health_path,
            "health check interval": _fmt_ms(self.interval_ms),
            "health check timeout": _fmt_ms(self.timeout_ms),
            "sticky cookie name": self.cookie_name,
            "sticky cookie httpOnly": self.cookie_http_only,
            "sticky cookie sameSite": self.cookie_same_site,
            "sticky cookie secure": self.cookie_secure,
        }


def _routing(hc: Mapping[str, Any] | None, cookie: Mapping[str, Any] | None) -> _Routing:
    hc = hc or {}
    has_cookie = cookie is not None
    cookie = cookie or {}
    return _Routing(
        health_path=str(hc["path"]) if hc.get("path") else None,
        interval_ms=parse_duration_ms(hc.get("interval", "30s")),
        timeout_ms=parse_duration_ms(hc.get("timeout", "5s")),
        cookie_name=str(cookie.get("name", "")) or ("(generated)" if has_cookie else None),
        cookie_http_only=_scalar(cookie.get("httponly", False)).lower() == "true",
        cookie_same_site=str(cookie["samesite"]).lower() if cookie.get("samesite") else None,
        cookie_secure=_scalar(cookie.get("secure", False)).lower() == "true",
    )


def _label_tree(labels: Mapping[str, str]) -> dict[str, Any]:
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


def _check_routing(
    r: _Routing, where: str, delay_ms: int, report: _Reporter, delay_source: str
) -> None:
    if r.health_path is None:
        report.error(
            f"{where}: no health check. Traefik keeps sending requests to a draining replica "
            f"until its listener closes, and each of them fails. Add a health check on "
            f"{HEALTH_PATH} (interval 2s, timeout 1s)."
        )
        return
    if r.health_path != HEALTH_PATH:
        report.warning(
            f"{where}: the health check polls {r.health_path}, not {HEALTH_PATH}; it will not "
            f"see the 503 a draining replica answers there unless your app maps it."
        )
    if r.interval_ms + r.timeout_ms > delay_ms:
        longer = "interval" if r.interval_ms > delay_ms else "interval + timeout"
        report.error(
            f"{where}: health check {longer} ({_fmt_ms(r.interval_ms)} + "
            f"{_fmt_ms(r.timeout_ms)}) does not fit inside the drain delay "
            f"({delay_source} = {delay_ms} ms): the replica can close its listener before "
            f"Traefik has seen a 503. Use interval 2s, timeout 1s, or raise {DELAY_VAR}."
        )
    if r.cookie_name is None:
        report.warning(
            f"{where}: no sticky cookie; SSE clients that reconnect may land on another replica "
            f"and lose per-replica state. Add sticky.cookie (name sf-aff, httpOnly, sameSite lax)."
        )
    else:
        if not r.cookie_http_only:
            report.warning(f"{where}: sticky cookie {r.cookie_name} is not httpOnly")
        if not r.cookie_same_site:
            report.warning(f"{where}: sticky cookie {r.cookie_name} has no sameSite (use lax)")


# -- reporting --------------------------------------------------------------------------------
class _Reporter:
    def __init__(self, file: str, out: list[Finding]) -> None:
        self.file, self.out = file, out

    def error(self, message: str) -> None:
        self.out.append(Finding("error", self.file, message))

    def warning(self, message: str) -> None:
        self.out.append(Finding("warning", self.file, message))


# -- docker compose ---------------------------------------------------------------------------
@dataclass
class _ComposeService:
    name: str
    file: str
    env: dict[str, str]
    labels: dict[str, str]
    tree: dict[str, Any]

    @property
    def pools(self) -> set[str]:
        services = self.tree.get("http", {}).get("services", {})
        return set(services) if isinstance(services, dict) else set()

    def routing(self, pool: str) -> _Routing:
        lb = self.tree["http"]["services"][pool].get("loadbalancer", {})
        sticky = lb.get("sticky", {})
        return _routing(lb.get("healthcheck"), sticky.get("cookie") if sticky else None)


def _check_compose(
    doc: Mapping[str, Any], file: str, env: Mapping[str, str], out: list[Finding]
) -> list[_ComposeService]:
    report = _Reporter(file, out)
    services = doc.get("services") or {}
    apps: list[_ComposeService] = []
    for name, svc in services.items():
        if not isinstance(svc, Mapping):
            continue
        svc_env = _as_dict(svc.get("environment"), env)
        labels = _as_dict(svc.get("labels"), env)
        labels.update(_as_dict((svc.get("deploy") or {}).get("labels"), env))
        tree = _label_tree(labels)
        # With exposedByDefault=false only `traefik.enable=true` routes; any http label
        # shows the intent too. `traefik.enable=false` always wins.
        enable = _scalar(tree.get("enable", "")).lower()
        routed = enable != "false" and (enable == "true" or "http" in tree)
        if not routed and not any(k.startswith("SF_") for k in svc_env):
            continue  # not an sf replica (Traefik itself, a database, ...)
        app = _ComposeService(str(name), file, svc_env, labels, tree)
        apps.append(app)
        where = f"service {name}"
        budget = _budget(svc_env)
        for problem in budget.problems:
            report.error(f"{where}: {problem}")
        raw_stop = svc.get("stop_grace_period")
        try:
            stop_ms = (
                _COMPOSE_STOP_MS
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
                    f"stop_grace_period: {budget.required_ms // 1000 + 5}s or more."
                )
        signal_name = str(svc.get("stop_signal", "SIGTERM")).upper()
        if signal_name not in ("SIGTERM", "TERM", "15"):
            report.error(
                f"{where}: stop_signal {signal_name}; the server drains on SIGTERM (SIGINT skips "
                f"the drain delay). Remove stop_signal or set it to SIGTERM."
            )
        if (
            svc_env.get("SF_DRAIN_AFTER_PROBES")
            and (svc.get("healthcheck") or {}).get("disable") is not True
        ):
            report.warning(
                f"{where}: SF_DRAIN_AFTER_PROBES counts every 503 probe of {HEALTH_PATH}, also "
                f"Docker's own healthcheck (compose or image HEALTHCHECK), which can end the "
                f"drain delay before Traefik has looked. Unset it, or disable Docker's healthcheck."
            )
        if not routed:
            report.warning(f"{where}: has SF_* settings but no Traefik labels (traefik.enable)")
            continue
        if not app.pools:
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
            _check_routing(
                r, f"{where}, Traefik service {pool}", budget.delay_ms, report, DELAY_VAR
            )
    _check_pools(apps, report)
    return apps


def _check_pools(apps: Sequence[_ComposeService], report: _Reporter) -> None:
    by_name = {a.name: a for a in apps}
    for a in apps:
        base = a.name.removesuffix("-candidate")
        if base != a.name and base in by_name and not (a.pools & by_name[base].pools):
            report.error(
                f"service {a.name} joins Traefik service(s) {sorted(a.pools) or 'none'} but "
                f"{base} joins {sorted(by_name[base].pools) or 'none'}: stopping {base} would "
                f"not move its traffic to the candidate. Give both the same labels."
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


# -- Traefik file provider --------------------------------------------------------------------
def _file_provider_routing(
    doc: Mapping[str, Any], file: str, delay_ms: int, out: list[Finding]
) -> dict[str, _Routing]:
    report = _Reporter(file, out)
    lowered = _lower_keys(doc)
    services = (lowered.get("http") or {}).get("services") or {}
    found: dict[str, _Routing] = {}
    for name, svc in services.items():
        lb = (svc or {}).get("loadbalancer")
        if lb is None:
            continue  # weighted / mirroring services point at load balancers checked themselves
        try:
            r = _routing(lb.get("healthcheck"), (lb.get("sticky") or {}).get("cookie"))
        except ValueError as exc:
            report.error(f"Traefik service {name}: {exc}")
            continue
        _check_routing(r, f"Traefik service {name}", delay_ms, report, "the drain delay")
        found[name] = r
    return found


def _check_traefik_static(doc: Mapping[str, Any], file: str, out: list[Finding]) -> None:
    report = _Reporter(file, out)
    g = _lower_keys(doc).get("global") or {}
    for key in ("checknewversion", "sendanonymoususage"):
        if _scalar(g.get(key, True)).lower() != "false":
            report.warning(f"global.{key} is not false: Traefik will contact the internet")


# -- Kubernetes -------------------------------------------------------------------------------
def _pod_spec(doc: Mapping[str, Any]) -> Mapping[str, Any] | None:
    kind = doc.get("kind")
    spec = doc.get("spec") or {}
    if kind == "Pod":
        return spec
    return ((spec.get("template") or {}).get("spec")) or None


def _prestop_sleep_s(container: Mapping[str, Any]) -> int:
    pre = ((container.get("lifecycle") or {}).get("preStop")) or {}
    if "sleep" in pre:
        return int((pre["sleep"] or {}).get("seconds", 0))
    command = " ".join(str(c) for c in ((pre.get("exec") or {}).get("command") or []))
    m = re.search(r"\bsleep\s+(\d+)", command)
    return int(m.group(1)) if m else 0


def _check_k8s(docs: Sequence[tuple[str, Mapping[str, Any]]], out: list[Finding]) -> None:
    workload_labels: list[dict[str, str]] = []
    for file, doc in docs:
        if doc.get("kind") not in _WORKLOAD_KINDS:
            continue
        report = _Reporter(file, out)
        spec = _pod_spec(doc)
        if spec is None:
            continue
        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
        template_meta = ((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}
        workload_labels.append(dict(template_meta.get("labels") or {}))
        containers = list(spec.get("containers") or [])
        sf_containers = [
            c
            for c in containers
            if any(str(e.get("name", "")).startswith("SF_") for e in c.get("env") or [])
        ] or containers
        period_s = spec.get("terminationGracePeriodSeconds", 30)
        for c in sf_containers:
            cw = f"{where}, container {c.get('name')}"
            env = {str(e["name"]): str(e["value"]) for e in c.get("env") or [] if "value" in e}
            budget = _budget(env)
            for problem in budget.problems:
                report.error(f"{cw}: {problem}")
            pre_s = _prestop_sleep_s(c)
            need_ms = budget.required_ms + pre_s * 1000
            if int(period_s) * 1000 < need_ms:
                extra = f" + preStop sleep ({pre_s} s)" if pre_s else ""
                report.error(
                    f"{cw}: terminationGracePeriodSeconds {period_s} is shorter than "
                    f"{budget.describe()}{extra}: the kubelet would SIGKILL the pod while it "
                    f"still drains. Set it to {need_ms // 1000 + 5} or more."
                )
            probe = c.get("readinessProbe")
            if not probe:
                report.error(
                    f"{cw}: no readinessProbe, so nothing takes a draining pod out of rotation "
                    f"except the termination itself. Add httpGet {HEALTH_PATH}, periodSeconds 2, "
                    f"timeoutSeconds 1, failureThreshold 1."
                )
            else:
                path = (probe.get("httpGet") or {}).get("path")
                if path != HEALTH_PATH:
                    report.warning(
                        f"{cw}: readinessProbe is not an httpGet of {HEALTH_PATH}; it will not "
                        f"see the 503 a draining pod answers there"
                    )
                period = int(probe.get("periodSeconds", 10)) * 1000
                timeout = int(probe.get("timeoutSeconds", 1)) * 1000
                failures = int(probe.get("failureThreshold", 3))
                if period + timeout > budget.delay_ms:
                    report.error(
                        f"{cw}: readinessProbe periodSeconds + timeoutSeconds "
                        f"({_fmt_ms(period)} + {_fmt_ms(timeout)}) does not fit inside the drain "
                        f"delay ({DELAY_VAR} = {budget.delay_ms} ms). Use periodSeconds 2, "
                        f"timeoutSeconds 1."
                    )
                elif failures * period + timeout > budget.delay_ms:
                    report.warning(
                        f"{cw}: readinessProbe needs failureThreshold x periodSeconds + "
                        f"timeoutSeconds = {_fmt_ms(failures * period + timeout)} to mark the pod "
                        f"unready, longer than the drain delay ({budget.delay_ms} ms); set "
                        f"failureThreshold 1"
                    )
            live = (c.get("livenessProbe") or {}).get("httpGet") or {}
            if live.get("path") == HEALTH_PATH:
                report.warning(
                    f"{cw}: livenessProbe on {HEALTH_PATH}, which answers 503 while starting and "
                    f"draining; a restart mid-drain cuts the queue drain short. Use /api/version."
                )
    for file, doc in docs:
        if doc.get("kind") != "Service":
            continue
        report = _Reporter(file, out)
        spec = doc.get("spec") or {}
        where = f"Service/{(doc.get('metadata') or {}).get('name', '?')}"
        if spec.get("sessionAffinity") != "ClientIP":
            report.warning(
                f"{where}: sessionAffinity is not ClientIP; reconnecting SSE clients may land on "
                f"another pod (or use cookie affinity in your ingress)"
            )
        selector = spec.get("selector") or {}
        if (
            workload_labels
            and selector
            and not any(
                all(lbls.get(k) == v for k, v in selector.items()) for lbls in workload_labels
            )
        ):
            report.error(f"{where}: selector {selector} matches no pod template given")


# -- entry points -----------------------------------------------------------------------------
def _classify(doc: Any) -> str | None:
    if not isinstance(doc, Mapping):
        return None
    if "apiVersion" in doc and "kind" in doc:
        return "k8s"
    if isinstance(doc.get("services"), Mapping):
        return "compose"
    keys = {str(k).lower() for k in doc}
    if "http" in keys or "tcp" in keys:
        return "traefik-dynamic"
    if keys & {"entrypoints", "providers"}:
        return "traefik-static"
    return None


def check_documents(
    documents: Sequence[tuple[str, Any]],
    *,
    env: Mapping[str, str] | None = None,
    drain_delay_ms: int | None = None,
) -> list[Finding]:
    """Run every check over already parsed YAML documents.

    Args:
        documents: (file name, parsed document) pairs; unrecognised documents are ignored.
        env: Values for `${VAR}` references in compose files (defaults apply otherwise).
        drain_delay_ms: The drain delay assumed for Traefik file-provider configuration, which
            does not say which replicas it fronts; the library default when None, or the delay
            of the compose services when compose files are part of the set.

    Returns:
        The findings, errors and warnings, in file order.
    """
    env = dict(env or {})
    out: list[Finding] = []
    compose_apps: list[_ComposeService] = []
    k8s: list[tuple[str, Mapping[str, Any]]] = []
    dynamic: list[tuple[str, Mapping[str, Any]]] = []
    for file, doc in documents:
        kind = _classify(doc)
        if kind == "compose":
            compose_apps += _check_compose(doc, file, env, out)
        elif kind == "k8s":
            k8s.append((file, doc))
        elif kind == "traefik-dynamic":
            dynamic.append((file, doc))
        elif kind == "traefik-static":
            _check_traefik_static(doc, file, out)
    _check_k8s(k8s, out)
    if drain_delay_ms is None:
        delays = [_budget(a.env).delay_ms for a in compose_apps]
        drain_delay_ms = min(delays) if delays else _DEFAULTS.drain_delay_ms
    for file, doc in dynamic:
        routings = _file_provider_routing(doc, file, drain_delay_ms, out)
        for pool, r in routings.items():
            for app in compose_apps:
                if pool not in app.pools:
                    continue
                try:
                    theirs = app.routing(pool).fields()
                except ValueError:
                    continue
                for key, value in r.fields().items():
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
    return out


def _yaml_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[str, bool]]:
    for p in paths:
        path = Path(p)
        if path.is_dir():
            for f in sorted(path.rglob("*")):
                if f.suffix in (".yaml", ".yml") and f.is_file():
                    yield str(f), False
        else:
            yield str(path), True


def check_paths(
    paths: Iterable[str | os.PathLike[str]],
    *,
    env: Mapping[str, str] | None = None,
    drain_delay_ms: int | None = None,
) -> list[Finding]:
    """Check files and directories (searched for `*.yaml`/`*.yml`) together.

    Files are checked as a set so that compose labels can be compared with the file-provider
    configuration and a Service with its Deployment. See `check_documents` for the arguments.
    """
    documents: list[tuple[str, Any]] = []
    out: list[Finding] = []
    for file, explicit in _yaml_files(paths):
        try:
            with open(file, encoding="utf-8") as f:
                docs = [d for d in yaml.safe_load_all(f) if d is not None]
        except (OSError, yaml.YAMLError) as exc:
            out.append(Finding("error", file, f"cannot read: {exc}"))
            continue
        recognised = [d for d in docs if _classify(d)]
        if explicit and not recognised:
            out.append(
                Finding(
                    "warning", file, "not a compose file, Kubernetes manifest or Traefik config"
                )
            )
        documents += [(file, d) for d in recognised]
    return out + check_documents(documents, env=env, drain_delay_ms=drain_delay_ms)


# -- command line -----------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of `sf-lifecycle check-infra`."""
    parser.description = (
        "Check compose files, Kubernetes manifests and Traefik file-provider configuration "
        "against sf-lifecycle's shutdown timings. Exit 1 when something is unsafe."
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="files or directories")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="VAR=VALUE",
        help="value for ${VAR} in compose files (repeatable); defaults apply otherwise",
    )
    parser.add_argument(
        "--drain-delay-ms",
        type=int,
        default=None,
        help="drain delay assumed for Traefik file-provider configuration",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("--quiet", action="store_true", help="print errors only")


def run(args: argparse.Namespace) -> int:
    """Run `check-infra`; 0 safe, 1 unsafe (or warnings with `--strict`), 2 bad arguments."""
    env: dict[str, str] = {}
    for item in args.env:
        if "=" not in item:
            print(f"check-infra: --env expects VAR=VALUE, got {item!r}", file=sys.stderr)
            return 2
        key, value = item.split("=", 1)
        env[key] = value
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        print(f"check-infra: no such file or directory: {', '.join(missing)}", file=sys.stderr)
        return 2
    findings = check_paths(args.paths, env=env, drain_delay_ms=args.drain_delay_ms)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    for f in findings:
        if f.severity == "error" or not args.quiet:
            print(f)
    unsafe = bool(errors) or (args.strict and bool(warnings))
    verdict = "UNSAFE" if unsafe else "ok"
    print(f"check-infra: {verdict}: {len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if unsafe else 0


#: `(add_arguments, run)` for the `check-infra` sub-command of `sf-lifecycle`.
COMMAND = (add_arguments, run)
