"""Cross-checks of deployment files against the library's shutdown timings: `check-infra`.

A zero-downtime upgrade depends on numbers spread over several files that nothing else compares:
the orchestrator's kill timeout must be the grace budget plus 10 s or more (the budget counts
from SIGTERM and contains the drain delay: the rule in `_infra_common.Budget`), the proxy's
health probe must notice the 503 inside the drain delay, and every replica of a pool must carry
the same proxy labels (Traefik's Docker provider drops a service whose containers disagree). Each
file can be valid on its own and the set still drop requests or SIGKILL a queue drain. This
module is the entry point and the report: it sorts the files it is given, hands each kind to its
checker (`_infra_compose`, `_infra_k8s`, `_infra_traefik`, and `_infra_bluegreen` for the weighted
routing across them), cross-checks compose labels against the file provider, and reports each
mismatch as a `Finding`:

- `error`: unsafe. Requests will fail or writes be cut off during an upgrade. Exit code 1.
- `warning`: likely a mistake, or safe only under conditions the files cannot show.

Values are read as the deployment would see them: `${VAR:-default}` resolves to the default
unless `--env VAR=value` is given (the process environment is deliberately not read, so the
result does not depend on the shell that runs the check), and a missing `SF_*` variable takes the
library's default from `Settings`. The health paths expected of probes and health checks are
under the service's `SF_HEALTH_PREFIX` (its compose `environment`, its container's `env`; for a
file-provider config, the routed compose services' one when they agree).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from ._config import parse_ms
from ._infra_backends import check_compose_backends, check_k8s_storage
from ._infra_bluegreen import StaticConfig, check_bluegreen
from ._infra_common import (
    DEFAULTS,
    Finding,
    HealthPaths,
    interpolate,
    parse_duration_ms,
    read_budget,
)
from ._infra_compose import (
    ComposeService,
    check_against_file_provider,
    check_compose,
    check_label_routers,
    compose_base,
    compose_problems,
    merge_compose,
)
from ._infra_k8s import check_k8s
from ._infra_traefik import check_traefik_static, file_provider_routing

__all__ = [
    "COMMAND",
    "Finding",
    "check_documents",
    "check_paths",
    "interpolate",
    "parse_duration_ms",
]


# -- entry points -----------------------------------------------------------------------------
def _classify(doc: Any) -> str | None:
    if not isinstance(doc, Mapping):
        return None
    if "apiVersion" in doc and "kind" in doc:
        return "k8s"
    if "services" in doc:  # of any shape: one compose refuses is reported as such
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
    compose_apps: list[ComposeService] = []
    k8s: list[tuple[str, Mapping[str, Any]]] = []
    dynamic: list[tuple[str, Mapping[str, Any]]] = []
    proxies: list[StaticConfig] = []
    compose_docs = {file: doc for file, doc in documents if _classify(doc) == "compose"}
    # What compose would refuse is reported, and that file is not checked (nor merged).
    overlay_names = {f for f, _ in documents if compose_base(f) in compose_docs}
    bad = {
        f
        for f, doc in documents
        if (f in compose_docs or f in overlay_names) and _bad_shape(f, doc, out)
    }
    overlays: list[tuple[str, Mapping[str, Any], str]] = []
    for file, doc in documents:
        kind = _classify(doc)
        base = compose_base(file)
        if file in bad or (base in bad and kind == "compose"):
            continue
        if kind == "compose" and base in compose_docs:
            overlays.append((file, doc, base))
        elif kind == "compose":
            apps = check_compose(doc, file, env, out, proxies)
            check_compose_backends(doc, apps, file, out)
            compose_apps += apps
        elif kind == "k8s":
            k8s.append((file, doc))
        elif kind == "traefik-dynamic":
            dynamic.append((file, doc))
        elif kind == "traefik-static":
            check_traefik_static(doc, file, out, proxies)
    for file, doc, base in overlays:
        _check_overlay(file, merge_compose(compose_docs[base], doc), base, env, out)
    check_k8s(k8s, out)
    check_k8s_storage(k8s, out)
    model = check_bluegreen(dynamic, proxies, out)
    check_label_routers(compose_apps, model, out)
    if drain_delay_ms is None:
        delays = [read_budget(a.env).delay_ms for a in compose_apps]
        drain_delay_ms = min(delays) if delays else DEFAULTS.drain_delay_ms
    # The file provider's services route to the compose services: their SF_HEALTH_PREFIX (one
    # value among them; the default when they disagree, which the pool check reports).
    prefixes = {HealthPaths.from_env(a.env) for a in compose_apps if a.routed}
    paths = prefixes.pop() if len(prefixes) == 1 else None
    for file, doc in dynamic:
        routings = file_provider_routing(doc, file, drain_delay_ms, out, model.pinned, paths)
        check_against_file_provider(file, routings, compose_apps, out)
    return out


def _bad_shape(file: str, doc: object, out: list[Finding]) -> bool:
    """Report what compose would refuse in `doc` (an overlay of any shape included)."""
    if not isinstance(doc, Mapping):
        problems = [f"is {type(doc).__name__}, not a mapping of compose keys"]
    else:
        problems = compose_problems(doc)
    out += [Finding("error", file, f"{p}: compose refuses this file") for p in problems]
    return bool(problems)


def _check_overlay(
    file: str, merged: Mapping[str, Any], base: str, env: Mapping[str, str], out: list[Finding]
) -> None:
    """An overlay as compose sees it, merged onto its base; only what the base alone lacks is
    reported (the base's own findings are already there, under its name)."""
    own: list[Finding] = []
    apps = check_compose(merged, file, env, own, [])
    check_compose_backends(merged, apps, file, own)
    known = {f.message for f in out if f.file == base}
    out += [f for f in own if f.message not in known]


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
    files = list(_yaml_files(paths))
    given = {os.path.normpath(f) for f, _ in files}
    for file, _ in list(files):
        base = compose_base(file)
        if base and os.path.normpath(base) not in given and Path(base).is_file():
            files.append((base, False))  # an overlay means nothing without its base
            given.add(os.path.normpath(base))
    for file, explicit in files:
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
        type=_duration_flag,
        default=None,
        help="drain delay assumed for Traefik file-provider configuration (1500, 500ms, 5s)",
    )
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings too")
    parser.add_argument("--quiet", action="store_true", help="print errors only")
    parser.add_argument(
        "--json",
        action="store_true",
        help='print one JSON object: {"ok", "errors", "warnings", "findings": [...]}',
    )


def _duration_flag(raw: str) -> int:
    try:
        return parse_ms(raw)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None  # argparse names the flag


def _refuse(message: str, as_json: bool) -> int:
    if as_json:
        print(json.dumps({"ok": False, "error": message}))
    print(f"check-infra: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """Run `check-infra`; 0 safe, 1 unsafe (or warnings with `--strict`), 2 bad arguments.

    With `--json` the answer is one JSON object on stdout, also for bad arguments
    (`{"ok": false, "error": ...}`, exit 2).
    """
    env: dict[str, str] = {}
    for item in args.env:
        if "=" not in item:
            return _refuse(f"--env expects VAR=VALUE, got {item!r}", args.json)
        key, value = item.split("=", 1)
        env[key] = value
    missing = [p for p in args.paths if not Path(p).exists()]
    if missing:
        return _refuse(f"no such file or directory: {', '.join(missing)}", args.json)
    findings = check_paths(args.paths, env=env, drain_delay_ms=args.drain_delay_ms)
    errors = [f for f in findings if f.severity == "error"]
    warnings = [f for f in findings if f.severity == "warning"]
    unsafe = bool(errors) or (args.strict and bool(warnings))
    if args.json:
        shown = [f for f in findings if f.severity == "error" or not args.quiet]
        print(
            json.dumps(
                {
                    "ok": not unsafe,
                    "errors": len(errors),
                    "warnings": len(warnings),
                    "findings": [dataclasses.asdict(f) for f in shown],
                }
            )
        )
        return 1 if unsafe else 0
    for f in findings:
        if f.severity == "error" or not args.quiet:
            print(f)
    verdict = "UNSAFE" if unsafe else "ok"
    print(f"check-infra: {verdict}: {len(errors)} error(s), {len(warnings)} warning(s)")
    return 1 if unsafe else 0


#: `(add_arguments, run)` for the `check-infra` sub-command of `sf-lifecycle`.
COMMAND = (add_arguments, run)
