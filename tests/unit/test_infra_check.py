"""The reference infra: valid against real schemas, consistent, and `check-infra` catches drift."""

from __future__ import annotations

import argparse
import copy
import importlib.resources
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs; the test extra has no types-jsonschema
import kubernetes_validate
import pytest
import yaml

from sf_lifecycle._config import Settings
from sf_lifecycle._infra_check import (
    COMMAND,
    Finding,
    check_documents,
    check_paths,
    interpolate,
    parse_duration_ms,
)
from sf_lifecycle.testing import TraefikRouting

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
COMPOSE = INFRA / "docker-compose.yaml"
DYNAMIC = INFRA / "traefik" / "dynamic" / "sf.yaml"
WEIGHTS = INFRA / "traefik" / "dynamic" / "weights.yaml"
COMPOSE_DYNAMIC = INFRA / "traefik" / "compose" / "sf.yaml"
COMPOSE_WEIGHTS = INFRA / "traefik" / "compose" / "weights.yaml"
STATIC = INFRA / "traefik" / "traefik.yaml"
K8S = [
    INFRA / "k8s" / "deployment.yaml",
    INFRA / "k8s" / "service.yaml",
    INFRA / "k8s" / "candidate.yaml",
]
#: Traefik's CRDs: no schema offline, checked by structure (test_kubernetes_weighted_routing).
K8S_TRAEFIK = INFRA / "k8s" / "traefik.yaml"
#: The Compose specification's schema, as vendored by check-jsonschema.
COMPOSE_SCHEMA = importlib.resources.files("check_jsonschema").joinpath(
    "builtin_schemas/vendor/compose-spec.json"
)
K8S_VERSION = "1.30"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def run_check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    add_arguments, run = COMMAND
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    code = run(parser.parse_args(argv))
    return code, capsys.readouterr().out


def errors(findings: list[Finding]) -> list[str]:
    return [f.message for f in findings if f.severity == "error"]


# -- schema validation ------------------------------------------------------------------------
def compose_errors(doc: Any) -> list[str]:
    schema = json.loads(COMPOSE_SCHEMA.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    return [e.message for e in validator.iter_errors(doc)]


def test_compose_file_validates_against_the_compose_spec() -> None:
    assert compose_errors(load(COMPOSE)) == []


def test_compose_validator_rejects_an_invalid_file() -> None:
    doc = load(COMPOSE)
    doc["services"]["sf"]["stop_grace_period"] = ["610s"]
    doc["services"]["sf"]["restart_policy"] = "always"
    found = compose_errors(doc)
    assert any("not of type 'string'" in m for m in found), found
    assert any("restart_policy" in m for m in found), found


@pytest.mark.parametrize("path", K8S, ids=lambda p: p.name)
def test_kubernetes_manifests_validate_strictly(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_kubernetes_weighted_routing() -> None:
    """Two Deployments, the candidate outside the stable Service, a TraefikService over both."""
    crds = {
        d["kind"] + "/" + d["metadata"]["name"]: d
        for d in yaml.safe_load_all(K8S_TRAEFIK.read_text())
    }
    weighted = crds["TraefikService/sf-weighted"]["spec"]["weighted"]
    assert [(s["name"], s["weight"]) for s in weighted["services"]] == [
        ("sf", 100),
        ("sf-candidate", 0),
    ]
    assert weighted["sticky"]["cookie"] == {"name": "sf-aff", "httpOnly": True, "sameSite": "lax"}
    route = crds["IngressRoute/sf"]["spec"]["routes"][0]["services"]
    assert route == [{"name": "sf-weighted", "kind": "TraefikService"}]
    verify = crds["IngressRoute/sf-candidate"]["spec"]["routes"][0]
    assert verify["services"][0]["name"] == "sf-candidate-verify"  # not the weighted child
    assert verify["middlewares"] == [{"name": "sf-candidate-allow"}]
    assert "ipAllowList" in crds["Middleware/sf-candidate-allow"]["spec"]
    stable_svc = next(d for d in yaml.safe_load_all(K8S[1].read_text()) if d["kind"] == "Service")
    cand = [d for d in yaml.safe_load_all(K8S[2].read_text()) if d]
    cand_pods = cand[0]["spec"]["template"]["metadata"]["labels"]
    sel = stable_svc["spec"]["selector"]
    assert not all(cand_pods.get(k) == v for k, v in sel.items())
    probe = cand[0]["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
    assert (probe["httpGet"]["path"], probe["periodSeconds"]) == ("/api/healthz", 2)
    assert check_paths([INFRA / "k8s"]) == []


def test_check_infra_reports_k8s_candidate_in_stable_pool_and_bad_weights(tmp_path: Path) -> None:
    docs = k8s_docs()
    cand = next(d for f, d in docs if f == "candidate.yaml" and d["kind"] == "Deployment")
    cand["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] = "sf"
    cand["spec"]["selector"]["matchLabels"]["app.kubernetes.io/name"] = "sf"
    assert any(
        "also matches the pods of sf-candidate: the candidate is in the stable pool" in m
        for m in errors(check_documents(docs))
    )
    crds = [d for d in yaml.safe_load_all(K8S_TRAEFIK.read_text())]
    crds[0]["spec"]["weighted"]["services"][1]["weight"] = -1
    del crds[0]["spec"]["weighted"]["sticky"]
    found = check_documents([("traefik.yaml", d) for d in crds])
    assert "weight of sf-candidate is -1, not an integer >= 0" in " ".join(errors(found))
    assert any(f.severity == "warning" and "no sticky cookie" in f.message for f in found)


def test_kubernetes_validator_rejects_an_invalid_manifest() -> None:
    doc = load(K8S[0])
    doc["spec"]["template"]["spec"]["terminationGracePeriodSecond"] = 610
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    doc = load(K8S[0])
    doc["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "610"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


# -- the reference files agree with each other and with the library --------------------------
def test_check_infra_finds_nothing_in_the_reference_infra(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert check_paths([INFRA]) == []
    code, out = run_check([str(INFRA), "--strict"], capsys)
    assert code == 0, out
    assert "0 error(s), 0 warning(s)" in out


def test_file_provider_config_is_what_the_harness_renders() -> None:
    r = TraefikRouting()
    assert load(DYNAMIC) == r.bluegreen_config(["http://127.0.0.1:4000"], ["http://127.0.0.1:4001"])
    assert load(WEIGHTS) == r.weights_config(stable=100, candidate=0)
    assert TraefikRouting.from_file(DYNAMIC.parent) == r
    weighted = load(WEIGHTS)["http"]["services"]["sf-weighted"]["weighted"]
    assert weighted["sticky"]["cookie"]["name"] == "sf-aff"
    # The candidate is its own pool, never in the stable one; each pool has its health check.
    pools = load(DYNAMIC)["http"]["services"]
    assert set(pools) == {"sf", "sf-candidate", "sf-candidate-verify"}
    for pool in pools.values():
        assert pool["loadBalancer"]["healthCheck"] == {
            "path": "/api/healthz",
            "interval": "2s",
            "timeout": "1s",
        }
        assert "sticky" not in pool["loadBalancer"]


def test_compose_routing_is_the_file_twin_by_container_name() -> None:
    """The compose file provider directory holds the same model, pools addressed by container."""
    r = TraefikRouting()
    doc = load(COMPOSE)
    assert load(COMPOSE_WEIGHTS) == load(WEIGHTS)
    routing = load(COMPOSE_DYNAMIC)["http"]
    twin = r.bluegreen_config(["http://sf-server:4000"], ["http://sf-server-candidate:4000"])
    assert routing["services"] == twin["http"]["services"]
    assert routing["routers"]["sf"]["service"] == r.weighted_service
    assert doc["services"]["sf"]["container_name"] == "sf-server"
    assert doc["services"]["sf-candidate"]["container_name"] == "sf-server-candidate"
    assert doc["services"]["sf"]["environment"]["SF_PORT"] == "4000"
    # Only the candidate's verification router comes from labels, through the allow-list.
    assert doc["services"]["sf"]["labels"] == {"traefik.enable": "false"}
    labels = doc["services"]["sf-candidate"]["labels"]
    assert labels["traefik.http.routers.sf-candidate.service"] == "sf-candidate-verify@file"
    assert labels["traefik.http.routers.sf-candidate.middlewares"] == "sf-candidate-allow@file"
    assert "sf-candidate-allow" in routing["middlewares"]
    assert not [k for k in labels if k.startswith("traefik.http.services.")]
    traefik = doc["services"]["traefik"]
    assert "./traefik/compose:/etc/traefik/dynamic:ro" in traefik["volumes"]
    assert "--metrics.prometheus.addServicesLabels=true" in traefik["command"]
    assert "--metrics.prometheus.entryPoint=traefik" in traefik["command"]
    assert "127.0.0.1:${SF_TRAEFIK_ADMIN_PORT:-8080}:8080" in traefik["ports"]


def test_compose_timings_match_the_library_defaults() -> None:
    defaults = Settings()
    doc = load(COMPOSE)
    for name in ("sf", "sf-candidate"):
        svc = doc["services"][name]
        env = {k: interpolate(v, {}) for k, v in svc["environment"].items()}
        assert int(env["SF_RPC_SHUTDOWN_GRACE_MS"]) == defaults.grace_ms == 600_000
        assert int(env["SF_DRAIN_DELAY_MS"]) == defaults.drain_delay_ms
        assert svc["stop_grace_period"] == "610s"
        assert svc["stop_signal"] == "SIGTERM"
        assert env["SF_STATE_DIR"] == "/var/lib/sf/state"
        assert "sf-state:/var/lib/sf/state" in svc["volumes"]
        assert "${SF_WORKSPACE_DIR:-./workspace}:/workspace" in svc["volumes"]
        assert "SF_DRAIN_AFTER_PROBES" not in env  # Docker's healthcheck would count as a probe
    assert doc["services"]["sf-candidate"]["profiles"] == ["candidate"]
    assert "profiles" not in doc["services"]["sf"]


def test_compose_variables_have_the_documented_defaults() -> None:
    text = COMPOSE.read_text()
    readme = (INFRA / "README.md").read_text()
    expected = {
        "SF_IMAGE": "registry.example.com/sf-lifecycle/sf-server:latest",
        "SF_CANDIDATE_IMAGE": "registry.example.com/sf-lifecycle/sf-server:candidate",
        "SF_HOSTNAME": "sf.localhost",
        "SF_WORKSPACE_DIR": "./workspace",
        "SF_TRAEFIK_HTTP_PORT": "80",
        "SF_TRAEFIK_HTTPS_PORT": "443",
        "SF_TRAEFIK_ADMIN_PORT": "8080",
        "SF_RPC_SHUTDOWN_GRACE_MS": "600000",
    }
    for var, default in expected.items():
        assert f"${{{var}:-{default}}}" in text, var
        assert re.search(rf"\| `{var}` \| `{re.escape(default)}` \|", readme), var


def test_traefik_never_phones_home_and_keeps_its_api_on_loopback() -> None:
    command = load(COMPOSE)["services"]["traefik"]["command"]
    assert "--global.checkNewVersion=false" in command
    assert "--global.sendAnonymousUsage=false" in command
    static = load(STATIC)
    assert static["global"] == {"checkNewVersion": False, "sendAnonymousUsage": False}
    for entrypoint in static["entryPoints"].values():
        assert entrypoint["address"].startswith("127.0.0.1:")
    assert static["ping"]["entryPoint"] == "traefik"
    watched = ROOT / static["providers"]["file"]["directory"]
    assert watched == DYNAMIC.parent
    assert static["providers"]["file"]["watch"] is True


def test_dockerfile_lets_the_server_drain() -> None:
    text = (INFRA / "Dockerfile").read_text()
    lines = [ln.strip() for ln in text.replace("\\\n", " ").splitlines() if ln.strip()]
    instr = [ln for ln in lines if not ln.startswith("#")]
    assert instr[0] == "FROM python:3.11-slim"
    assert "STOPSIGNAL SIGTERM" in instr
    entry = [ln for ln in instr if ln.startswith("ENTRYPOINT")]
    assert len(entry) == 1
    assert json.loads(entry[0].removeprefix("ENTRYPOINT")) == [
        "sf-lifecycle",
        "serve",
        "examples.sf_server:app",
    ]
    user = [ln for ln in instr if ln.startswith("USER ")]
    assert user
    assert user[-1].split()[1].split(":")[0] not in ("root", "0")
    health = [ln for ln in instr if ln.startswith("HEALTHCHECK")]
    assert len(health) == 1
    assert "/api/healthz" in health[0]
    assert "curl" not in health[0]
    interval = re.search(r"--interval=(\S+)", health[0])
    timeout = re.search(r"--timeout=(\S+)", health[0])
    assert interval
    assert timeout
    assert (
        parse_duration_ms(interval.group(1)) + parse_duration_ms(timeout.group(1))
        <= Settings().drain_delay_ms
    )


def test_kubernetes_manifests_cover_grace_and_drain() -> None:
    deployment = load(K8S[0])
    pod = deployment["spec"]["template"]["spec"]
    assert pod["terminationGracePeriodSeconds"] >= 610
    probe = pod["containers"][0]["readinessProbe"]
    assert probe["httpGet"]["path"] == "/api/healthz"
    assert probe["periodSeconds"] == 2
    service = next(d for d in yaml.safe_load_all(K8S[1].read_text()) if d["kind"] == "Service")
    assert service["spec"]["sessionAffinity"] == "ClientIP"
    assert "preStop" in K8S[0].read_text()  # the consideration is written down


# -- check-infra reports unsafe changes -------------------------------------------------------
Mutation = Callable[[dict[str, Any]], None]

#: Label-defined pools (Traefik's Docker provider), as a compose file without the blue/green
#: model declares them: the generic checks of labels are exercised on two replicas of one pool.
POOL_LABELS = {
    "traefik.enable": "true",
    "traefik.http.routers.sf.rule": "Host(`sf.localhost`)",
    "traefik.http.routers.sf.entrypoints": "web",
    "traefik.http.routers.sf.service": "sf",
    "traefik.http.services.sf.loadbalancer.server.port": "4000",
    "traefik.http.services.sf.loadbalancer.healthcheck.path": "/api/healthz",
    "traefik.http.services.sf.loadbalancer.healthcheck.interval": "2s",
    "traefik.http.services.sf.loadbalancer.healthcheck.timeout": "1s",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.name": "sf-aff",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.httponly": "true",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.samesite": "lax",
}
REPLICAS = ("sf", "sf-b")


def labelled_compose() -> dict[str, Any]:
    """The reference compose file with two replicas `sf`, `sf-b` of one label-defined pool."""
    doc: dict[str, Any] = copy.deepcopy(load(COMPOSE))
    for svc in doc["services"].values():
        for key in ("labels", "environment"):
            if key in svc:
                svc[key] = dict(svc[key])
    b = doc["services"].pop("sf-candidate")
    b.pop("profiles")
    doc["services"]["sf-b"] = b
    for name in REPLICAS:
        doc["services"][name]["labels"] = dict(POOL_LABELS)
    return doc


def _short_grace(d: dict[str, Any]) -> None:
    d["services"]["sf"]["stop_grace_period"] = "30s"


def _long_interval(d: dict[str, Any]) -> None:
    for name in REPLICAS:
        d["services"][name]["labels"][
            "traefik.http.services.sf.loadbalancer.healthcheck.interval"
        ] = "10s"


def _no_healthcheck(d: dict[str, Any]) -> None:
    for name in REPLICAS:
        labels = d["services"][name]["labels"]
        for key in [k for k in labels if ".healthcheck." in k]:
            del labels[key]


def _replica_labels_differ(d: dict[str, Any]) -> None:
    labels = d["services"]["sf-b"]["labels"]
    labels["traefik.http.services.sf.loadbalancer.sticky.cookie.name"] = "sf-other"


def _candidate_in_stable_pool(d: dict[str, Any]) -> None:
    # Today's identical-labels model: the candidate joins `sf` the moment it is healthy.
    d["services"]["sf-candidate"] = copy.deepcopy(d["services"]["sf-b"])


def _grace_raised_in_env(d: dict[str, Any]) -> None:
    d["services"]["sf"]["environment"]["SF_RPC_SHUTDOWN_GRACE_MS"] = "900000"


def _delay_equals_grace(d: dict[str, Any]) -> None:
    d["services"]["sf"]["environment"]["SF_DRAIN_DELAY_MS"] = "600000"


def _no_grace_period(d: dict[str, Any]) -> None:
    del d["services"]["sf"]["stop_grace_period"]


def _sigint(d: dict[str, Any]) -> None:
    d["services"]["sf"]["stop_signal"] = "SIGINT"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_short_grace, "service sf: stop_grace_period 30s is shorter than"),
        (_no_grace_period, "stop_grace_period absent (Docker's default 10 s)"),
        (_grace_raised_in_env, "SF_RPC_SHUTDOWN_GRACE_MS (900000 ms, from SIGTERM"),
        (_delay_equals_grace, "SF_DRAIN_DELAY_MS (600000 ms) must be shorter than"),
        (_long_interval, "health check interval (10 s + 1 s) does not fit inside the drain"),
        (_no_healthcheck, "no health check"),
        (_replica_labels_differ, "label traefik.http.services.sf.loadbalancer.sticky.cookie"),
        (_candidate_in_stable_pool, "service sf-candidate joins the stable pool sf of sf"),
        (_sigint, "stop_signal SIGINT"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:30],
)
def test_check_infra_reports_unsafe_compose(
    mutate: Mutation, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    doc = labelled_compose()
    mutate(doc)
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out = run_check([str(path)], capsys)
    assert code == 1, out
    assert expected in out, out
    assert "UNSAFE" in out


def test_check_infra_reports_file_provider_drift(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dynamic = TraefikRouting().dynamic_config(["http://127.0.0.1:4000"])
    dynamic["http"]["services"]["sf"]["loadBalancer"]["healthCheck"]["timeout"] = "2s"
    dynamic["http"]["services"]["sf"]["loadBalancer"]["sticky"]["cookie"]["sameSite"] = "strict"
    (tmp_path / "dynamic").mkdir()
    (tmp_path / "dynamic" / "sf.yaml").write_text(yaml.safe_dump(dynamic))
    compose = tmp_path / "docker-compose.yaml"
    compose.write_text(yaml.safe_dump(labelled_compose()))
    code, out = run_check([str(compose), str(tmp_path / "dynamic")], capsys)
    assert code == 1, out
    assert "health check timeout is '2 s' here but '1 s' in the labels of service sf" in out
    assert "sticky cookie sameSite is 'strict' here but 'lax'" in out


def test_check_infra_resolves_variables_from_env_flags(capsys: pytest.CaptureFixture[str]) -> None:
    paths = [str(COMPOSE), str(COMPOSE_DYNAMIC.parent)]
    code, out = run_check([*paths, "--env", "SF_DRAIN_DELAY_MS=2000"], capsys)
    assert code == 1, out
    assert "does not fit inside the drain delay (the drain delay = 2000 ms)" in out
    code, out = run_check([*paths, "--env", "SF_RPC_SHUTDOWN_GRACE_MS=60000"], capsys)
    assert code == 0, out


def k8s_docs() -> list[tuple[str, Any]]:
    return [(p.name, d) for p in K8S for d in yaml.safe_load_all(p.read_text()) if d]


def _container(docs: list[tuple[str, Any]]) -> dict[str, Any]:
    c: dict[str, Any] = docs[0][1]["spec"]["template"]["spec"]["containers"][0]
    return c


def test_check_infra_reports_unsafe_kubernetes() -> None:
    assert check_documents(k8s_docs()) == []

    docs = k8s_docs()
    del docs[0][1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert any(
        "terminationGracePeriodSeconds 30 is shorter" in m for m in errors(check_documents(docs))
    )

    docs = k8s_docs()
    _container(docs)["lifecycle"] = {"preStop": {"sleep": {"seconds": 10}}}
    found = errors(check_documents(docs))
    assert any("+ preStop sleep (10 s)" in m and "Set it to 620 or more" in m for m in found), found

    docs = k8s_docs()
    del _container(docs)["readinessProbe"]
    assert any("no readinessProbe" in m for m in errors(check_documents(docs)))

    docs = k8s_docs()
    _container(docs)["readinessProbe"]["periodSeconds"] = 10
    assert any("does not fit inside the drain" in m for m in errors(check_documents(docs)))

    docs = k8s_docs()
    docs[1][1]["spec"]["selector"] = {"app.kubernetes.io/name": "other"}
    assert any("matches no pod template" in m for m in errors(check_documents(docs)))


def test_check_infra_warnings_fail_only_with_strict(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    service = next(d for d in yaml.safe_load_all(K8S[1].read_text()) if d["kind"] == "Service")
    del service["spec"]["sessionAffinity"]
    path = tmp_path / "service.yaml"
    path.write_text(yaml.safe_dump(service))
    code, out = run_check([str(path)], capsys)
    assert code == 0, out
    assert "WARNING" in out
    assert "sessionAffinity is not ClientIP" in out
    code, out = run_check([str(path), "--strict"], capsys)
    assert code == 1, out


def test_check_infra_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = run_check([str(tmp_path / "missing.yaml")], capsys)
    assert code == 2
    code, _ = run_check([str(COMPOSE), "--env", "NOEQUALS"], capsys)
    assert code == 2
    broken = tmp_path / "broken.yaml"
    broken.write_text("services: [unclosed\n")
    code, out = run_check([str(broken)], capsys)
    assert code == 1
    assert "cannot read" in out


def _compose_docs(mutate: Mutation) -> list[tuple[str, Any]]:
    doc = labelled_compose()
    mutate(doc)
    return [("docker-compose.yaml", doc)]


def _set(service: str, key: str, value: object) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        d["services"][service][key] = value

    mutate.__name__ = f"{service}.{key}={value}"
    return mutate


def _env(service: str, var: str, value: str) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        d["services"][service]["environment"][var] = value

    mutate.__name__ = f"{service}.env.{var}={value}"
    return mutate


def _label(name: str, value: str | None) -> Mutation:
    def mutate(d: dict[str, Any]) -> None:
        for svc in REPLICAS:
            labels = d["services"][svc]["labels"]
            key = f"traefik.http.services.sf.loadbalancer.{name}"
            if value is None:
                labels.pop(key)
            else:
                labels[key] = value

    mutate.__name__ = f"label {name}={value}"
    return mutate


def _only_enable(d: dict[str, Any]) -> None:
    for svc in REPLICAS:
        d["services"][svc]["labels"] = ["traefik.enable=true"]


def _no_sticky(d: dict[str, Any]) -> None:
    for svc in REPLICAS:
        labels = d["services"][svc]["labels"]
        d["services"][svc]["labels"] = {k: v for k, v in labels.items() if ".sticky." not in k}


def _no_labels(d: dict[str, Any]) -> None:
    for svc in REPLICAS:
        del d["services"][svc]["labels"]


@pytest.mark.parametrize(
    ("mutate", "severity", "expected"),
    [
        (_env("sf", "SF_DRAIN_DELAY_MS", "soon"), "error", "'soon' is not a duration"),
        (_set("sf", "stop_grace_period", "ten minutes"), "error", "not a duration"),
        (_env("sf", "SF_DRAIN_AFTER_PROBES", "1"), "warning", "also Docker's own healthcheck"),
        (_label("healthcheck.path", "/ping"), "warning", "/ping, which does not gate"),
        (_label("healthcheck.interval", "soon"), "error", "not a duration"),
        (_no_sticky, "warning", "no sticky cookie"),
        (_label("sticky.cookie.httponly", None), "warning", "is not httpOnly"),
        (_label("sticky.cookie.samesite", None), "warning", "has no sameSite"),
        (_only_enable, "error", "without traefik.http.services.<name>.loadbalancer"),
        (_no_labels, "warning", "has SF_* settings but no Traefik labels"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:40],
)
def test_check_infra_reports_compose_details(
    mutate: Mutation, severity: str, expected: str
) -> None:
    found = check_documents(_compose_docs(mutate))
    assert any(f.severity == severity and expected in f.message for f in found), found


def test_check_infra_kubernetes_warnings() -> None:
    docs = k8s_docs()
    container = _container(docs)
    container["readinessProbe"]["failureThreshold"] = 3
    container["livenessProbe"]["httpGet"]["path"] = "/api/healthz"
    container["env"].append({"name": "SF_DRAIN_DELAY_MS", "value": "later"})
    found = check_documents(docs)
    messages = [f"{f.severity}: {f.message}" for f in found]
    assert any("warning" in m and "failureThreshold x periodSeconds" in m for m in messages)
    assert any("warning" in m and "livenessProbe on /api/healthz" in m for m in messages)
    assert any("error" in m and "'later' is not a duration in milliseconds" in m for m in messages)

    docs = k8s_docs()
    _container(docs)["readinessProbe"] = {
        "tcpSocket": {"port": 4000},
        "periodSeconds": 2,
        "failureThreshold": 1,
    }
    found = check_documents(docs)
    assert [f.severity for f in found] == ["warning"], found
    assert "not an httpGet of /api/healthz" in found[0].message


def test_check_infra_traefik_static_and_unknown_files(tmp_path: Path) -> None:
    static = load(STATIC)
    static["global"]["sendAnonymousUsage"] = True
    (tmp_path / "traefik.yaml").write_text(yaml.safe_dump(static))
    (tmp_path / "other.yaml").write_text("just: data\n")
    found = check_paths([tmp_path])  # a directory: unrelated YAML is skipped silently
    assert [(f.severity, Path(f.file).name) for f in found] == [("warning", "traefik.yaml")]
    assert "sendanonymoususage is not false" in found[0].message
    found = check_paths([tmp_path / "other.yaml"])  # named explicitly: say it was not checked
    assert [f.severity for f in found] == ["warning"]
    assert "not a compose file" in found[0].message


def test_check_infra_file_provider_alone_uses_the_default_drain_delay() -> None:
    dynamic, weights = load(DYNAMIC), load(WEIGHTS)
    docs = [("d/sf.yaml", dynamic), ("d/weights.yaml", weights)]
    assert check_documents(docs) == []
    found = check_documents(docs, drain_delay_ms=2500)
    assert any("does not fit inside the drain delay" in m for m in errors(found)), found
    del dynamic["http"]["services"]["sf"]["loadBalancer"]["healthCheck"]
    assert any("no health check" in m for m in errors(check_documents(docs)))


# -- small parsers ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "ms"),
    [
        ("610s", 610_000),
        ("1m30s", 90_000),
        ("500ms", 500),
        ("1.5s", 1_500),
        ("2", 2_000),
        (3, 3_000),
    ],
)
def test_parse_duration(text: object, ms: float) -> None:
    assert parse_duration_ms(text) == ms


@pytest.mark.parametrize("text", ["", "10x", "s", "1s2", "abc"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration_ms(text)


@pytest.mark.parametrize(
    ("text", "env", "out"),
    [
        ("${A:-x}", {}, "x"),
        ("${A:-x}", {"A": ""}, "x"),
        ("${A-x}", {"A": ""}, ""),
        ("${A:-x}", {"A": "y"}, "y"),
        ("${A}", {"A": "y"}, "y"),
        ("$A/b", {"A": "y"}, "y/b"),
        ("$$A", {"A": "y"}, "$A"),
        ("${A:+set}", {"A": "y"}, "set"),
        ("Host(`${H:-sf.localhost}`)", {}, "Host(`sf.localhost`)"),
    ],
)
def test_interpolate(text: str, env: dict[str, str], out: str) -> None:
    assert interpolate(text, env) == out


# -- the one budget rule, on its exact boundaries ---------------------------------------------
@pytest.mark.parametrize(
    ("grace", "stop", "safe"),
    [
        ("600000", "610s", True),  # the reference files: budget + 10 s
        ("600000", "609999ms", False),
        ("600000", "609s", False),
        ("600000", "605s", False),  # "grace + drain delay", a formulation no longer accepted
        ("600s", "610s", True),  # the budget in the duration grammar `serve` reads
        ("10m", "10m10s", True),
        ("20000", "30s", True),
        ("20001", "30s", False),
    ],
)
def test_compose_kill_timeout_is_the_budget_plus_10_s(grace: str, stop: str, safe: bool) -> None:
    def mutate(d: dict[str, Any]) -> None:
        d["services"]["sf"]["environment"]["SF_RPC_SHUTDOWN_GRACE_MS"] = grace
        d["services"]["sf"]["environment"]["SF_DRAIN_DELAY_MS"] = "5000"
        d["services"]["sf"]["stop_grace_period"] = stop

    found = [m for m in errors(check_documents(_compose_docs(mutate))) if "stop_grace_period" in m]
    assert (found == []) is safe, found
    if not safe:
        assert "+ 10 s =" in found[0]


@pytest.mark.parametrize(
    ("grace", "period", "pre_stop", "safe"),
    [
        ("600000", 610, 0, True),
        ("600000", 609, 0, False),
        ("600000", 619, 10, False),
        ("600000", 620, 10, True),
        ("20s", 30, 0, True),
        ("20001", 30, 0, False),
    ],
)
def test_kubernetes_grace_period_is_the_budget_plus_10_s_plus_pre_stop(
    grace: str, period: int, pre_stop: int, safe: bool
) -> None:
    docs = k8s_docs()
    container = _container(docs)
    container["env"] = [e for e in container["env"] if e["name"] != "SF_RPC_SHUTDOWN_GRACE_MS"]
    container["env"].append({"name": "SF_RPC_SHUTDOWN_GRACE_MS", "value": grace})
    if pre_stop:
        container["lifecycle"] = {"preStop": {"sleep": {"seconds": pre_stop}}}
    docs[0][1]["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = period
    found = [m for m in errors(check_documents(docs)) if "terminationGracePeriodSeconds" in m]
    assert (found == []) is safe, found


# -- probes gate on readiness; liveness never does --------------------------------------------
@pytest.mark.parametrize(
    ("probe", "path", "warned"),
    [
        ("readinessProbe", "/api/healthz", None),
        ("readinessProbe", "/api/ready", None),
        ("readinessProbe", "/api/version", "does not answer 503 while the pod drains, recovers"),
        ("livenessProbe", "/api/livez", None),
        ("livenessProbe", "/api/healthz", "livenessProbe on /api/healthz"),
        ("livenessProbe", "/api/ready", "livenessProbe on /api/ready"),
        ("startupProbe", "/api/livez", None),
        ("startupProbe", "/api/healthz", "startupProbe on /api/healthz"),
    ],
)
def test_kubernetes_probes_point_at_the_right_routes(
    probe: str, path: str, warned: str | None
) -> None:
    docs = k8s_docs()
    _container(docs)[probe]["httpGet"]["path"] = path
    warnings = [f.message for f in check_documents(docs) if f.severity == "warning"]
    if warned is None:
        assert warnings == []
    else:
        assert any(warned in w for w in warnings), warnings


def test_a_proxy_probing_a_path_that_does_not_gate_on_readiness_is_warned() -> None:
    def mutate(d: dict[str, Any]) -> None:
        for svc in REPLICAS:
            key = "traefik.http.services.sf.loadbalancer.healthcheck.path"
            d["services"][svc]["labels"][key] = "/api/livez"

    found = [f.message for f in check_documents(_compose_docs(mutate))]
    assert any("polls /api/livez, which does not gate on readiness" in m for m in found), found


# -- --json -----------------------------------------------------------------------------------
def test_check_infra_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out = run_check([str(INFRA), "--json"], capsys)
    assert code == 0
    assert json.loads(out) == {"ok": True, "errors": 0, "warnings": 0, "findings": []}

    doc = labelled_compose()
    doc["services"]["sf"]["stop_grace_period"] = "30s"
    path = tmp_path / "docker-compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    code, out = run_check([str(path), "--json"], capsys)
    body = json.loads(out)
    assert code == 1
    assert body["ok"] is False
    assert body["errors"] == len(body["findings"]) >= 1
    assert body["findings"][0]["severity"] == "error"
    assert body["findings"][0]["file"] == str(path)
    assert "stop_grace_period 30s is shorter" in body["findings"][0]["message"]

    code, out = run_check([str(tmp_path / "missing.yaml"), "--json"], capsys)
    assert code == 2
    assert json.loads(out) == {
        "ok": False,
        "error": f"no such file or directory: {tmp_path / 'missing.yaml'}",
    }


def test_check_infra_drain_delay_flag_takes_a_duration(capsys: pytest.CaptureFixture[str]) -> None:
    code, _out = run_check([str(INFRA), "--drain-delay-ms", "5s"], capsys)
    assert code == 0
    with pytest.raises(SystemExit):
        run_check([str(INFRA), "--drain-delay-ms", "5 s"], capsys)
    assert "--drain-delay-ms: not a duration" in capsys.readouterr().err


def _infra_under_prefix(tmp_path: Path, move_paths: bool) -> Path:
    """The reference infra with SF_HEALTH_PREFIX=/internal in every service's environment
    (compose, k8s), and its probes and health checks moved there too when `move_paths`."""
    import shutil

    copy_dir = tmp_path / "infra"
    shutil.copytree(INFRA, copy_dir)
    for path in copy_dir.rglob("*.yaml"):
        text = path.read_text()
        text = text.replace(
            '  SF_HOST: "0.0.0.0"\n', '  SF_HOST: "0.0.0.0"\n  SF_HEALTH_PREFIX: "/internal"\n'
        )
        text = re.sub(
            r'( +)- name: SF_HOST\n( +)value: "0.0.0.0"\n',
            r'\1- name: SF_HOST\n\2value: "0.0.0.0"\n'
            r"\1- name: SF_HEALTH_PREFIX\n\2value: /internal\n",
            text,
        )
        if move_paths:
            text = re.sub(r"/api/(healthz|ready|livez|version)\b", r"/internal/\1", text)
        path.write_text(text)
    return copy_dir


def test_check_infra_reads_the_health_prefix_from_the_services_environment(
    tmp_path: Path,
) -> None:
    moved = _infra_under_prefix(tmp_path / "moved", move_paths=True)
    assert "SF_HEALTH_PREFIX" in (moved / "docker-compose.yaml").read_text()
    assert "SF_HEALTH_PREFIX" in (moved / "k8s" / "deployment.yaml").read_text()
    # Moved consistently: nothing to say (no "Poll /api/healthz" for a path that is 404).
    assert [f.message for f in check_paths([moved])] == []
    # Prefix moved, probes not: each warning names the path the replica really serves.
    stale = check_paths([_infra_under_prefix(tmp_path / "stale", move_paths=False)])
    warned = [f.message for f in stale]
    assert warned
    assert not [m for m in warned if "Poll /api/" in m or "Add httpGet /api/" in m]
    assert any(m.endswith("Poll /internal/healthz.") for m in warned)
    assert any("readinessProbe is not an httpGet of /internal/healthz" in m for m in warned)
