"""check-infra on shared backends: the multi-host compose overlay, StatefulSet and recovery Job.

Each bad variant is one change to a shipped file, and must give exactly the findings listed.
"""

from __future__ import annotations

import copy
import importlib.resources
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs
import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from sf_lifecycle._infra_backends import inline_password
from sf_lifecycle._infra_check import check_documents, check_paths
from sf_lifecycle._infra_compose import compose_base, merge_compose

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"
BASE = INFRA / "docker-compose.yaml"
OVERLAY = INFRA / "docker-compose.multihost.yaml"
MULTIHOST = INFRA / "k8s" / "multihost"
STATEFULSET = MULTIHOST / "statefulset.yaml"
JOB = MULTIHOST / "recover-job.yaml"
K8S_VERSION = "1.30"

Doc = dict[str, Any]
Expected = list[tuple[str, str]]


def load(path: Path) -> Doc:
    doc: Doc = yaml.safe_load(path.read_text())
    return doc


def load_all(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def found(docs: list[tuple[str, Any]]) -> list[tuple[str, str]]:
    return [(f.severity, f.message) for f in check_documents(docs)]


def assert_exactly(got: list[tuple[str, str]], expected: Expected) -> None:
    """Every finding is one of `expected` (severity, start of the message), each found once."""
    assert len(got) == len(expected), got
    for (severity, message), (want_sev, want) in zip(sorted(got), sorted(expected), strict=True):
        assert (severity, message[: len(want)]) == (want_sev, want), got


# -- the shipped files ------------------------------------------------------------------------
def test_the_overlay_and_the_merged_file_validate_against_the_compose_spec() -> None:
    schema = json.loads(
        importlib.resources.files("check_jsonschema")
        .joinpath("builtin_schemas/vendor/compose-spec.json")
        .read_text()
    )
    validator = jsonschema.Draft202012Validator(schema)
    for doc in (load(OVERLAY), merge_compose(load(BASE), load(OVERLAY))):
        assert [e.message for e in validator.iter_errors(doc)] == []


@pytest.mark.parametrize("path", [STATEFULSET, JOB], ids=lambda p: p.name)
def test_multihost_manifests_validate_strictly(path: Path) -> None:
    docs = load_all(path)
    assert docs
    for doc in docs:
        assert kubernetes_validate.validate(doc, K8S_VERSION, strict=True) == K8S_VERSION


def test_the_multihost_files_pass_check_infra() -> None:
    assert check_paths([MULTIHOST]) == []
    assert check_paths([BASE, OVERLAY, INFRA / "traefik" / "compose"]) == []


def test_the_overlay_as_compose_merges_it() -> None:
    """Backends healthy before the replicas, each replica its own queue volume, no password."""
    merged = merge_compose(load(BASE), load(OVERLAY))
    services = merged["services"]
    assert services["postgres"]["image"] == "postgres:17"
    assert services["postgres"]["healthcheck"]["test"][:2] == ["CMD", "pg_isready"]
    assert services["postgres"]["environment"]["POSTGRES_PASSWORD_FILE"].startswith("/run/secrets/")
    assert merged["secrets"]["sf_postgres_password"] == {"environment": "SF_POSTGRES_PASSWORD"}
    assert services["redis"]["image"] == "redis:7.4"
    assert services["redis"]["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "--appendonly" in services["redis"]["command"]
    for name, volume in (("sf", "sf-state"), ("sf-candidate", "sf-candidate-state")):
        svc = services[name]
        assert svc["depends_on"] == {
            "postgres": {"condition": "service_healthy"},
            "redis": {"condition": "service_healthy"},
        }
        assert [v for v in svc["volumes"] if v.endswith(":/var/lib/sf/state")] == [
            f"{volume}:/var/lib/sf/state"
        ]
        assert svc["environment"]["SF_DATABASE_URL"].startswith(
            "postgresql://sf:${SF_POSTGRES_PASSWORD:?"
        )
        assert svc["environment"]["SF_REDIS_URL"] == "redis://redis:6379/0"
        assert svc["stop_grace_period"] == "610s"  # the base's drain settings are kept
    assert "ports" not in services["postgres"]
    assert "ports" not in services["redis"]
    # The single-host variant is the base alone: no backend, one shared state volume.
    assert {"postgres", "redis"}.isdisjoint(load(BASE)["services"])
    assert "infra/.env" in (ROOT / ".gitignore").read_text().split()


def test_the_statefulset_keeps_one_claim_per_pod_and_the_job_recovers_one() -> None:
    sts = next(d for d in load_all(STATEFULSET) if d["kind"] == "StatefulSet")
    spec = sts["spec"]
    assert spec["persistentVolumeClaimRetentionPolicy"] == {
        "whenDeleted": "Retain",
        "whenScaled": "Retain",
    }
    (template,) = spec["volumeClaimTemplates"]
    assert (template["metadata"]["name"], template["spec"]["accessModes"]) == (
        "state",
        ["ReadWriteOnce"],
    )
    container = spec["template"]["spec"]["containers"][0]
    env = {e["name"]: e for e in container["env"]}
    for var, key in (("SF_DATABASE_URL", "database-url"), ("SF_REDIS_URL", "redis-url")):
        assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "sf-backends", "key": key}
    headless = next(
        d for d in load_all(STATEFULSET) if d["metadata"]["name"] == spec["serviceName"]
    )
    assert headless["spec"]["clusterIP"] == "None"
    job = load(JOB)
    pod = job["spec"]["template"]["spec"]
    (recover,) = pod["containers"]
    assert recover["command"] == [
        "sf-lifecycle",
        "queue",
        "recover",
        "--state-dir",
        "/var/lib/sf/state",
        "--app",
        "examples.sf_server:app",
    ]
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "state-sf-2"
    assert job["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"] != "sf"


@pytest.mark.parametrize(
    ("file", "base"),
    [
        ("infra/docker-compose.multihost.yaml", "infra/docker-compose.yaml"),
        ("compose.prod.yml", "compose.yml"),
        ("infra/docker-compose.yaml", None),
        ("infra/k8s/statefulset.yaml", None),
    ],
)
def test_compose_base(file: str, base: str | None) -> None:
    assert compose_base(file) == base


@pytest.mark.parametrize(
    ("url", "inline"),
    [
        ("postgresql://sf:hunter2@postgres:5432/sf", True),
        ("postgresql://sf:pre${PW}@postgres/sf", True),
        ("postgresql://sf:${SF_POSTGRES_PASSWORD:?set it/now}@postgres:5432/sf", False),
        ("postgresql://sf:$PW@postgres/sf", False),
        ("postgresql://sf@postgres/sf", False),
        ("${SF_DATABASE_URL}", False),
        ("redis://redis:6379/0", False),
    ],
)
def test_inline_password(url: str, inline: bool) -> None:
    assert inline_password(url) is inline


# -- compose: each bad variant, its findings ---------------------------------------------------
Mutation = Callable[[Doc], None]


def _url_with_password(o: Doc) -> None:
    o["x-sf-backends"] = None
    o["services"]["sf"]["environment"] = {
        "SF_DATABASE_URL": "postgresql://sf:hunter2@postgres:5432/sf",
        "SF_REDIS_URL": "redis://redis:6379/0",
    }


def _no_postgres_service(o: Doc) -> None:
    del o["services"]["postgres"]
    for name in ("sf", "sf-candidate"):
        o["services"][name]["depends_on"] = {"redis": {"condition": "service_healthy"}}


def _localhost(o: Doc) -> None:
    o["services"]["sf"]["environment"] = {**o["services"]["sf"]["environment"]}
    o["services"]["sf"]["environment"]["SF_REDIS_URL"] = "redis://localhost:6379/0"


def _http_scheme(o: Doc) -> None:
    o["services"]["sf"]["environment"] = {**o["services"]["sf"]["environment"]}
    o["services"]["sf"]["environment"]["SF_REDIS_URL"] = "http://redis:6379"


def _depends_without_condition(o: Doc) -> None:
    o["services"]["sf"]["depends_on"] = ["postgres"]


def _redis_without_healthcheck(o: Doc) -> None:
    del o["services"]["redis"]["healthcheck"]


def _postgres_password_inline(o: Doc) -> None:
    env = o["services"]["postgres"]["environment"]
    del env["POSTGRES_PASSWORD_FILE"]
    env["POSTGRES_PASSWORD"] = "hunter2"


def _unpinned_and_no_volume(o: Doc) -> None:
    o["services"]["postgres"]["image"] = "postgres:latest"
    del o["services"]["postgres"]["volumes"]


def _redis_without_aof(o: Doc) -> None:
    o["services"]["redis"]["command"] = "redis-server"


def _external_database(o: Doc) -> None:
    for name in ("sf", "sf-candidate"):
        env = o["services"][name]["environment"] = {**o["services"][name]["environment"]}
        env["SF_DATABASE_URL"] = "postgresql://sf:${PW}@db.example.internal:5432/sf"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (
            _url_with_password,
            [("error", "service sf: SF_DATABASE_URL has its password written in the file")],
        ),
        (
            _no_postgres_service,
            [
                ("error", "service sf: SF_DATABASE_URL points at host postgres, but no service"),
                ("error", "service sf-candidate: SF_DATABASE_URL points at host postgres, but"),
            ],
        ),
        (_localhost, [("error", "service sf: SF_REDIS_URL points at localhost, the replica's")]),
        (_http_scheme, [("error", "service sf: SF_REDIS_URL is not a redis:// or rediss:// URL")]),
        (
            _depends_without_condition,
            [
                ("warning", "service sf: condition service_started for postgres (the host of"),
                ("warning", "service sf: no depends_on for redis (the host of SF_REDIS_URL)"),
            ],
        ),
        (
            _redis_without_healthcheck,
            [
                ("error", "service redis (the host of SF_REDIS_URL of sf) has no healthcheck"),
                ("error", "service redis (the host of SF_REDIS_URL of sf-candidate) has no"),
            ],
        ),
        (
            _postgres_password_inline,
            [("error", "service postgres: POSTGRES_PASSWORD is written in the file")],
        ),
        (
            _unpinned_and_no_volume,
            [
                ("warning", "service postgres: image postgres:latest is not pinned"),
                ("warning", "service postgres: no volume at /var/lib/postgresql/data"),
            ],
        ),
        (_redis_without_aof, [("warning", "service redis: Redis runs without --appendonly yes")]),
        (_external_database, []),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:30],
)
def test_check_infra_on_a_changed_overlay(mutate: Mutation, expected: Expected) -> None:
    overlay = copy.deepcopy(load(OVERLAY))
    mutate(overlay)
    routing = [(str(p), load(p)) for p in sorted((INFRA / "traefik" / "compose").glob("*.yaml"))]
    docs = [(str(BASE), load(BASE)), (str(OVERLAY), overlay), *routing]
    findings = check_documents(docs)
    assert {f.file for f in findings} <= {str(OVERLAY)}
    assert_exactly([(f.severity, f.message) for f in findings], expected)


def test_a_base_finding_is_reported_once_under_the_base(tmp_path: Path) -> None:
    """The overlay is checked merged onto its base, even when given alone; the base's own
    problems are reported under the base only."""
    base = load(BASE)
    base["services"]["sf"]["stop_grace_period"] = "30s"
    (tmp_path / "docker-compose.yaml").write_text(yaml.safe_dump(base))
    overlay = load(OVERLAY)
    overlay["services"]["sf"]["depends_on"] = ["postgres", "redis"]
    (tmp_path / "docker-compose.multihost.yaml").write_text(yaml.safe_dump(overlay))
    findings = check_paths([tmp_path / "docker-compose.multihost.yaml"])
    by_file = sorted((Path(f.file).name, f.severity, f.message[:40]) for f in findings)
    assert by_file == [
        ("docker-compose.multihost.yaml", "warning", "service sf: condition service_started fo"),
        ("docker-compose.multihost.yaml", "warning", "service sf: condition service_started fo"),
        ("docker-compose.yaml", "error", "service sf: stop_grace_period 30s is sho"),
        ("docker-compose.yaml", "warning", "service sf: has SF_* settings but no Tra"),
    ]


# -- Kubernetes: each bad variant, its findings ------------------------------------------------
def multihost_docs() -> list[tuple[str, Doc]]:
    return [(p.name, d) for p in (STATEFULSET, JOB) for d in load_all(p)]


def _sts(docs: list[tuple[str, Doc]]) -> Doc:
    return next(d for _, d in docs if d["kind"] == "StatefulSet")


def _job_container(docs: list[tuple[str, Doc]]) -> Doc:
    job = next(d for _, d in docs if d["kind"] == "Job")
    c: Doc = job["spec"]["template"]["spec"]["containers"][0]
    return c


def _sf_env(docs: list[tuple[str, Doc]]) -> list[Doc]:
    env: list[Doc] = _sts(docs)["spec"]["template"]["spec"]["containers"][0]["env"]
    return env


def _k_inline_url(docs: list[tuple[str, Doc]]) -> None:
    env = next(e for e in _sf_env(docs) if e["name"] == "SF_DATABASE_URL")
    del env["valueFrom"]
    env["value"] = "postgresql://sf:hunter2@db.example.internal/sf"


def _k_no_claim_templates(docs: list[tuple[str, Doc]]) -> None:
    spec = _sts(docs)["spec"]
    del spec["volumeClaimTemplates"]
    spec["template"]["spec"]["volumes"].append({"name": "state", "emptyDir": {}})


def _k_rwx(docs: list[tuple[str, Doc]]) -> None:
    _sts(docs)["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] = ["ReadWriteMany"]


def _k_delete_on_scale(docs: list[tuple[str, Doc]]) -> None:
    _sts(docs)["spec"]["persistentVolumeClaimRetentionPolicy"]["whenScaled"] = "Delete"


def _k_not_headless(docs: list[tuple[str, Doc]]) -> None:
    _sts(docs)["spec"]["serviceName"] = "sf"


def _k_no_state_mount(docs: list[tuple[str, Doc]]) -> None:
    c = _sts(docs)["spec"]["template"]["spec"]["containers"][0]
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "state"]


def _k_job_without_app(docs: list[tuple[str, Doc]]) -> None:
    _job_container(docs)["command"] = _job_container(docs)["command"][:5]


def _k_job_without_database(docs: list[tuple[str, Doc]]) -> None:
    c = _job_container(docs)
    c["env"] = [e for e in c["env"] if e["name"] != "SF_DATABASE_URL"]


def _k_job_wrong_state_dir(docs: list[tuple[str, Doc]]) -> None:
    _job_container(docs)["command"][4] = "/state"


def _k_job_other_claim(docs: list[tuple[str, Doc]]) -> None:
    job = next(d for _, d in docs if d["kind"] == "Job")
    job["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"] = "data"


STS = "StatefulSet/sf, container sf: "
JOBC = "Job/sf-recover-state-sf-2, container recover: "


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (_k_inline_url, [("error", f"{STS}SF_DATABASE_URL has its password in the manifest")]),
        (
            _k_no_claim_templates,
            [
                ("error", f"{STS}SF_STATE_DIR is on volume state, not from volumeClaimTemplates"),
                ("error", f"{STS}SF_STATE_DIR /var/lib/sf/state is an emptyDir"),
                ("warning", f"{JOBC}claim state-sf-2 is none of the StatefulSet claims ()"),
            ],
        ),
        (_k_rwx, [("warning", f"{STS}volumeClaimTemplates state is ReadWriteMany")]),
        (
            _k_delete_on_scale,
            [("error", "StatefulSet/sf: persistentVolumeClaimRetentionPolicy.whenScaled is")],
        ),
        (_k_not_headless, [("error", "StatefulSet/sf: serviceName sf is not a headless")]),
        (
            _k_no_state_mount,
            [("error", f"{STS}SF_STATE_DIR /var/lib/sf/state is on the container's own")],
        ),
        (_k_job_without_app, [("error", f"{JOBC}queue recover without --app delivers into")]),
        (
            _k_job_without_database,
            [("error", f"{JOBC}the StatefulSet delivers into SF_DATABASE_URL but this Job")],
        ),
        (_k_job_wrong_state_dir, [("error", f"{JOBC}queue recover --state-dir /state is not")]),
        (
            _k_job_other_claim,
            [("warning", f"{JOBC}claim data is none of the StatefulSet claims (state-sf-<")],
        ),
    ],
    ids=lambda v: getattr(v, "__name__", "")[:30],
)
def test_check_infra_on_a_changed_statefulset_or_job(
    mutate: Callable[[list[tuple[str, Doc]]], None], expected: Expected
) -> None:
    docs = multihost_docs()
    assert found(docs) == []
    mutate(docs)
    assert_exactly(found(docs), expected)


def test_deployment_replicas_sharing_a_read_write_once_claim() -> None:
    """The single-store Deployment is fine on its ReadWriteMany claim, not on a ReadWriteOnce one
    (pods on other nodes stay Pending); one replica may use it."""
    docs = [
        (p.name, d)
        for p in (INFRA / "k8s" / "deployment.yaml", INFRA / "k8s" / "service.yaml")
        for d in load_all(p)
    ]
    assert found(docs) == []
    claim = next(d for _, d in docs if d["kind"] == "PersistentVolumeClaim")
    claim["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert_exactly(
        found(docs),
        [
            (
                "error",
                "Deployment/sf, container sf: 2 replicas share the ReadWriteOnce claim sf-state",
            )
        ],
    )
    next(d for _, d in docs if d["kind"] == "Deployment")["spec"]["replicas"] = 1
    assert found(docs) == []


# -- compose files compose itself would refuse, and odd values --------------------------------
def _hostile_base() -> Doc:
    return {
        "services": {
            "sf": {
                "image": "sf:1",
                "stop_grace_period": "610s",
                "environment": {"SF_REDIS_URL": "redis://redis:6379/0"},
                "depends_on": {"redis": {"condition": "service_healthy"}},
            },
            "redis": {
                "image": "redis:7.2",
                "command": ["redis-server", "--appendonly", "yes"],
                "healthcheck": {"test": ["CMD", "redis-cli", "ping"]},
            },
        }
    }


def _overlay_findings(overlay: object) -> list[tuple[str, str, str]]:
    """The findings of `overlay` merged onto `_hostile_base()`, but the base's own."""
    docs = [("docker-compose.yaml", _hostile_base()), ("docker-compose.x.yaml", overlay)]
    base = {f.message for f in check_documents(docs[:1])}
    return [(f.severity, f.file, f.message) for f in check_documents(docs) if f.message not in base]


@pytest.mark.parametrize(
    ("overlay", "problem"),
    [
        ({"services": {"redis": {"healthcheck": "redis-cli ping"}}}, "service redis: healthcheck"),
        ({"services": {"redis": {"command": 5}}}, "service redis: command"),
        ({"services": {"redis": [1, 2]}}, "service redis: is a list"),
        ({"services": ["redis"]}, "services: is a list"),
        ({"services": {"sf": {"environment": {"SF_REDIS_URL": "redis://[::1"}}}}, "SF_REDIS_URL"),
        ({"services": {"sf": {"environment": {"SF_REDIS_URL": "redis://r:x/0"}}}}, "SF_REDIS_URL"),
        ({"services": {"sf": {"environment": {"A": {"b": 1}}}}}, "environment: A"),
        ({"services": {"sf": {"volumes": [["a"]]}}}, "volumes"),
    ],
)
def test_an_overlay_of_a_shape_compose_refuses_is_a_finding_not_a_crash(
    overlay: Doc, problem: str
) -> None:
    """Steps: a valid base, an overlay with one odd value. Before, check-infra died with a
    traceback on most of these; now the overlay gets an error naming it and the problem."""
    assert _overlay_findings({"services": {}}) == []
    got = _overlay_findings(overlay)
    assert [m for sev, file, m in got if sev == "error" and file == "docker-compose.x.yaml"], got
    assert any(problem in m for _, file, m in got if file == "docker-compose.x.yaml"), got


def test_an_empty_backend_url_in_compose_passes_the_shells_through() -> None:
    """`SF_REDIS_URL:` without a value takes the shell's (or nothing): not an error."""
    assert _overlay_findings({"services": {"sf": {"environment": {"SF_REDIS_URL": None}}}}) == []
    assert _overlay_findings({"services": {"sf": {"environment": ["SF_REDIS_URL"]}}}) == []


def test_the_inline_password_hint_names_a_variable_of_that_backend() -> None:
    url = "redis://:hunter2@redis:6379/0"
    got = _overlay_findings({"services": {"sf": {"environment": {"SF_REDIS_URL": url}}}})
    assert len(got) == 1, got
    assert "${SF_REDIS_PASSWORD}" in got[0][2]
    assert "POSTGRES" not in got[0][2]


_YAML_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=8,
)
_KEYS = st.sampled_from(
    [
        "image", "command", "entrypoint", "environment", "labels", "healthcheck", "volumes",
        "depends_on", "deploy", "container_name", "hostname", "stop_grace_period",
        "stop_signal", "services",
    ]
)  # fmt: skip


@settings(max_examples=300, deadline=None)
@given(
    service=st.sampled_from(["sf", "redis", "postgres", "new"]),
    key=_KEYS,
    value=_YAML_VALUES,
    env_value=_YAML_VALUES,
)
def test_random_yaml_shapes_in_an_overlay_never_crash_check_infra(
    service: str, key: str, value: object, env_value: object
) -> None:
    overlay = {
        "services": {
            service: {key: value},
            "sf": {"environment": {"SF_REDIS_URL": env_value, "SF_DATABASE_URL": env_value}},
        }
    }
    for doc in (overlay, {"services": value}, value):
        findings = _overlay_findings(doc)  # must not raise
        assert all(
            file in ("docker-compose.yaml", "docker-compose.x.yaml") for _, file, _ in findings
        )
