"""`check-infra` learns the blue/green model: each rule, and that its bad variant is reported."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from sf_lifecycle._infra_check import Finding, check_paths

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"

Edit = Callable[[Path], None]


def _yaml_edit(rel: str, change: Callable[[Any], None]) -> Edit:
    def edit(root: Path) -> None:
        path = root / rel
        doc = yaml.safe_load(path.read_text())
        change(doc)
        path.write_text(yaml.safe_dump(doc))

    return edit


def _weighted(doc: Any) -> Any:
    return doc["http"]["services"]["sf-weighted"]["weighted"]


def _pools(doc: Any) -> Any:
    return doc["http"]["services"]


def run_on_copy(tmp_path: Path, edit: Edit) -> list[Finding]:
    root = tmp_path / "infra"
    shutil.copytree(INFRA, root)
    edit(root)
    return check_paths([root])


def messages(found: list[Finding], severity: str) -> list[str]:
    return [
        f"{Path(f.file).parent.name}/{Path(f.file).name}: {f.message}"
        for f in found
        if f.severity == severity
    ]


def test_reference_infra_is_clean(tmp_path: Path) -> None:
    assert run_on_copy(tmp_path, lambda root: None) == []


def _route_verify_to_child(root: Path) -> None:
    path = root / "k8s" / "traefik.yaml"
    path.write_text(path.read_text().replace("- name: sf-candidate-verify", "- name: sf-candidate"))


CASES: list[tuple[str, Edit, str, str]] = [
    (
        "candidate server in the stable pool",
        _yaml_edit(
            "traefik/dynamic/sf.yaml",
            lambda d: _pools(d)["sf"]["loadBalancer"]["servers"].append(
                {"url": "http://127.0.0.1:4001"}
            ),
        ),
        "error",
        "dynamic/weights.yaml: weighted service sf-weighted: candidate server(s) "
        "http://127.0.0.1:4001 are also in the stable pool sf",
    ),
    (
        "weights file missing",
        lambda root: (root / "traefik/dynamic/weights.yaml").unlink(),
        "error",
        "dynamic/sf.yaml: router sf points at Traefik service sf-weighted, which no file of this "
        "directory defines (the weights file is missing?)",
    ),
    (
        "weights file missing (pools without a weighted service)",
        lambda root: (root / "traefik/compose/weights.yaml").unlink(),
        "error",
        "compose/sf.yaml: pools sf and sf-candidate exist but no weighted service spans them",
    ),
    (
        "negative weight",
        _yaml_edit(
            "traefik/dynamic/weights.yaml",
            lambda d: _weighted(d)["services"][1].update(weight=-5),
        ),
        "error",
        "weight of sf-candidate is -5, not an integer >= 0",
    ),
    (
        "weight not a number",
        _yaml_edit(
            "traefik/dynamic/weights.yaml",
            lambda d: _weighted(d)["services"][0].update(weight="lots"),
        ),
        "error",
        "weight of sf is 'lots', not an integer >= 0",
    ),
    (
        "all weights 0",
        _yaml_edit(
            "traefik/dynamic/weights.yaml",
            lambda d: _weighted(d)["services"][0].update(weight=0),
        ),
        "error",
        "weighted service sf-weighted: every weight is 0",
    ),
    (
        "unknown child",
        _yaml_edit(
            "traefik/compose/weights.yaml",
            lambda d: _weighted(d)["services"][1].update(name="sf-next"),
        ),
        "error",
        "compose/weights.yaml: weighted service sf-weighted: child sf-next is not defined in "
        "this directory: Traefik disables sf-weighted and every router on it answers 404",
    ),
    (
        "no sticky cookie on the weighted service",
        _yaml_edit("traefik/dynamic/weights.yaml", lambda d: _weighted(d).pop("sticky")),
        "warning",
        "dynamic/weights.yaml: weighted service sf-weighted: no sticky cookie",
    ),
    (
        "the same cookie on a pool",
        _yaml_edit(
            "traefik/dynamic/sf.yaml",
            lambda d: _pools(d)["sf"]["loadBalancer"].update(
                sticky={"cookie": {"name": "sf-aff", "httpOnly": True, "sameSite": "lax"}}
            ),
        ),
        "error",
        "pool sf sets the same sticky cookie sf-aff as the weighted service",
    ),
    (
        "metrics off in the static file",
        _yaml_edit("traefik/traefik.yaml", lambda d: d.pop("metrics")),
        "error",
        "traefik/traefik.yaml: Traefik's Prometheus metrics are off",
    ),
    (
        "metrics without per-service labels in compose",
        _yaml_edit(
            "docker-compose.yaml",
            lambda d: d["services"]["traefik"]["command"].remove(
                "--metrics.prometheus.addServicesLabels=true"
            ),
        ),
        "error",
        "infra/docker-compose.yaml: Traefik's Prometheus addServicesLabels is off",
    ),
    (
        "verification router on the weighted child (file provider)",
        _yaml_edit(
            "traefik/dynamic/sf.yaml",
            lambda d: d["http"]["routers"]["sf-candidate"].update(service="sf-candidate"),
        ),
        "error",
        "dynamic/sf.yaml: router sf-candidate points at sf-candidate, a child of weighted "
        "service sf-weighted: its requests count in sf-candidate's metrics",
    ),
    (
        "verification router on the weighted child (compose labels)",
        _yaml_edit(
            "docker-compose.yaml",
            lambda d: d["services"]["sf-candidate"]["labels"].update(
                {"traefik.http.routers.sf-candidate.service": "sf-candidate@file"}
            ),
        ),
        "error",
        "infra/docker-compose.yaml: label router sf-candidate points at sf-candidate, a child",
    ),
    (
        "verification route on the weighted child (kubernetes)",
        _route_verify_to_child,
        "error",
        "k8s/traefik.yaml: IngressRoute/sf-candidate: routes to Service sf-candidate, a child of "
        "TraefikService sf-weighted",
    ),
    (
        "metrics on the public entrypoint",
        _yaml_edit(
            "traefik/traefik.yaml", lambda d: d["metrics"]["prometheus"].update(entryPoint="web")
        ),
        "error",
        "Traefik's metrics are on entrypoint web, which serves routers: they would be public",
    ),
]


@pytest.mark.parametrize(
    ("edit", "severity", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_bad_variant_is_reported(tmp_path: Path, edit: Edit, severity: str, expected: str) -> None:
    found = run_on_copy(tmp_path, edit)
    got = messages(found, severity)
    assert any(expected in m for m in got), "\n".join(m.__str__() for m in found)


def test_compose_alone_names_the_replica_no_pool_routes(tmp_path: Path) -> None:
    """Without the file-provider directory, nothing shows that `sf` is routed: say so."""
    found = check_paths([INFRA / "docker-compose.yaml"])
    assert [(f.severity, f.message.split(":")[0]) for f in found] == [("warning", "service sf")]
    assert "no file-provider pool in the files checked names it" in found[0].message
    assert check_paths([INFRA / "docker-compose.yaml", INFRA / "traefik" / "compose"]) == []
