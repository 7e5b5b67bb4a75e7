"""Cross-checks of deployment files against the library's shutdown timings: `check-infra`.

A zero-downtime upgrade depends on numbers spread over several files that nothing else compares:
the orchestrator's kill timeout must outlast the grace budget (which includes the drain delay,
shorter than it: the rule in `_infra_common.Budget`), the proxy's
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
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ._infra_bluegreen import (
    StaticConfig,
    check_bluegreen,
    static_from_doc,
    static_from_flags,
    verify_shares_child,
)
from ._infra_common import (
    COMPOSE_STOP_MS,
    DEFAULTS,
    DELAY_VAR,
    GRACE_VAR,
    HEALTH_PATH,
    Finding,
    Reporter,
    as_dict,
    fmt_ms,
    interpolate,
    lower_keys,
    parse_duration_ms,
    read_budget,
    scalar,
)
from ._infra_k8s import _check_k8s

__all__ = [
    "COMMAND",
    "Finding",
    "check_documents",
    "check_paths",
    "interpolate",
    "parse_duration_ms",
]


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
            "health check interval": fmt_ms(self.interval_ms),
            "health check timeout": fmt_ms(self.timeout_ms),
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
        cookie_http_only=scalar(cookie.get("httponly", False)).lower() == "true",
        cookie_same_site=str(cookie["samesite"]).lower() if cookie.get("samesite") else None,
        cookie_secure=scalar(cookie.get("secure", False)).lower() == "true",
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
    r: _Routing, where: str, delay_ms: int, report: Reporter, delay_source: str
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
            f"{where}: health check {longer} ({fmt_ms(r.interval_ms)} + "
            f"{fmt_ms(r.timeout_ms)}) does not fit inside the drain delay "
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


# -- docker compose ---------------------------------------------------------------------------
@dataclass
class _ComposeService:
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

    def routing(self, pool: str) -> _Routing:
        lb = self.tree["http"]["services"][pool].get("loadbalancer", {})
        sticky = lb.get("sticky", {})
        return _routing(lb.get("healthcheck"), sticky.get("cookie") if sticky else None)


def _check_compose(
    doc: Mapping[str, Any],
    file: str,
    env: Mapping[str, str],
    out: list[Finding],
    proxies: list[StaticConfig],
) -> list[_ComposeService]:
    report = Reporter(file, out)
    services = doc.get("services") or {}
    apps: list[_ComposeService] = []
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
        tree = _label_tree(labels)
        # With exposedByDefault=false only `traefik.enable=true` routes; any http label
        # shows the intent too. `traefik.enable=false` always wins.
        enable = scalar(tree.get("enable", "")).lower()
        routed = enable != "false" and (enable == "true" or "http" in tree)
        if not routed and not any(k.startswith("SF_") for k in svc_env):
            continue  # not an sf replica (Traefik itself, a database, ...)
        hosts = frozenset({str(name), str(svc.get("container_name", name))})
        app = _ComposeService(str(name), file, svc_env, labels, tree, routed, hosts)
        apps.append(app)
        where = f"service {name}"
        budget = read_budget(svc_env)
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
            continue  # fine if a file-provider pool names it; see check_documents
        routers = (tree.get("http") or {}).get("routers") or {}
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
            _check_routing(
                r, f"{where}, Traefik service {pool}", budget.delay_ms, report, DELAY_VAR
            )
    _check_pools(apps, report)
    return apps


def _check_pools(apps: Sequence[_ComposeService], report: Reporter) -> None:
    by_name = {a.name: a for a in apps}
    for a in apps:
        base = a.name.removesuffix("-candidate")
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


# -- Traefik file provider --------------------------------------------------------------------
def _file_provider_routing(
    doc: Mapping[str, Any],
    file: str,
    delay_ms: int,
    out: list[Finding],
    pinned: frozenset[str] = frozenset(),
) -> dict[str, _Routing]:
    report = Reporter(file, out)
    lowered = lower_keys(doc)
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
        if name in pinned and r.cookie_name is None:
            # A child of a weighted service with a sticky cookie: that cookie pins the client.
            r = _Routing(
                r.health_path, r.interval_ms, r.timeout_ms, "(weighted)", True, "lax", False
            )
        _check_routing(r, f"Traefik service {name}", delay_ms, report, "the drain delay")
        found[name] = r
    return found


def _check_traefik_static(
    doc: Mapping[str, Any], file: str, out: list[Finding], proxies: list[StaticConfig]
) -> None:
    report = Reporter(file, out)
    proxies.append(static_from_doc(file, doc))
    g = lower_keys(doc).get("global") or {}
    for key in ("checknewversion", "sendanonymoususage"):
        if scalar(g.get(key, True)).lower() != "false":
            report.warning(f"global.{key} is not false: Traefik will contact the internet")


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
    proxies: list[StaticConfig] = []
    for file, doc in documents:
        kind = _classify(doc)
        if kind == "compose":
            compose_apps += _check_compose(doc, file, env, out, proxies)
        elif kind == "k8s":
            k8s.append((file, doc))
        elif kind == "traefik-dynamic":
            dynamic.append((file, doc))
        elif kind == "traefik-static":
            _check_traefik_static(doc, file, out, proxies)
    _check_k8s(k8s, out)
    model = check_bluegreen(dynamic, proxies, out)
    for app in compose_apps:
        for rname, router in ((app.tree.get("http") or {}).get("routers") or {}).items():
            base, _, provider = str((router or {}).get("service", "")).lower().partition("@")
            if provider == "file" and base in model.children:
                out.append(
                    verify_shares_child(app.file, f"label router {rname}", base, "(weights file)")
                )
    for app in compose_apps:
        if not app.routed and not (app.hosts & model.server_hosts):
            out.append(
                Finding(
                    "warning",
                    app.file,
                    f"service {app.name}: has SF_* settings but no Traefik labels "
                    f"(traefik.enable), and no file-provider pool in the files checked names it",
                )
            )
    if drain_delay_ms is None:
        delays = [read_budget(a.env).delay_ms for a in compose_apps]
        drain_delay_ms = min(delays) if delays else DEFAULTS.drain_delay_ms
    for file, doc in dynamic:
        routings = _file_provider_routing(doc, file, drain_delay_ms, out, model.pinned)
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
