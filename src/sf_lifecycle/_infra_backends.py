"""`check-infra` for shared backends and per-replica state: databases, claims, recovery Jobs.

With `SF_DATABASE_URL` (PostgreSQL) and `SF_REDIS_URL` (Redis) the replicas share no file: the
state directory holds only each replica's own write-ahead queue. What can go wrong is then
spread over the same files as before, and none of it shows until a replica moves or goes away:

- compose: a URL naming a host no service provides, or the replica's own container; a password
  written in the file; a replica that starts before its database answers (no `depends_on` with
  `condition: service_healthy`, or a database without a healthcheck); an unpinned database
  image; a PostgreSQL without a data volume, a Redis without `appendonly`.
- Kubernetes: a URL in a manifest rather than a Secret; a state directory on the container's
  own filesystem or an `emptyDir` (acknowledged writes die with the pod); a StatefulSet whose
  state is not from `volumeClaimTemplates` (or is `ReadWriteMany`, which buys nothing but weak
  locks) when a database URL is set; claims deleted on scale-down; replicas of a Deployment
  sharing a `ReadWriteOnce` claim; a recovery Job (`sf-lifecycle queue recover`) whose
  `--state-dir` is not the mounted claim, or that would deliver into SQLite on the orphaned
  volume (no `--app` or no `SF_DATABASE_URL`) instead of the database the servers use.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from ._infra_common import Finding, Reporter
from ._infra_compose import ComposeService, raw_mapping

__all__ = ["BACKEND_VARS", "check_compose_backends", "check_k8s_storage"]

#: The URL settings of the shared backends and the schemes each accepts.
BACKEND_VARS: dict[str, tuple[str, ...]] = {
    "SF_DATABASE_URL": ("postgres", "postgresql"),
    "SF_REDIS_URL": ("redis", "rediss"),
}
_REF = re.compile(r"\$\{[^}]*\}|\$[A-Za-z_]\w*")
_LOCAL = {"localhost", "127.0.0.1", "::1"}
_RECOVER_HINT = "e.g. --app examples.sf_server:app (infra/k8s/multihost/recover-job.yaml)"


#: The variable the inline-password hint suggests, per URL setting.
_PASSWORD_VARS = {"SF_DATABASE_URL": "SF_POSTGRES_PASSWORD", "SF_REDIS_URL": "SF_REDIS_PASSWORD"}


def inline_password(raw: str) -> bool:
    """True when the URL `raw` (before interpolation) carries a password written out in it.

    The userinfo runs to the last `@` (as `urlsplit` and the drivers read it), and a URL that
    cannot be split counts as one with a password: the checks say what is wrong with it.
    """
    text = _REF.sub("\0", raw)
    _, sep, rest = text.partition("://")
    userinfo = rest.rpartition("@")[0] if sep else ""
    password = userinfo.partition(":")[2]
    return bool(password.replace("\0", ""))


# -- compose ----------------------------------------------------------------------------------
def _image(svc: Mapping[str, Any]) -> tuple[str, str]:
    image = str(svc.get("image", ""))
    name, _, tag = image.rpartition(":") if ":" in image.rsplit("/", 1)[-1] else (image, "", "")
    return name.rsplit("/", 1)[-1].lower(), tag.split("@")[0]


def check_compose_backends(
    doc: Mapping[str, Any],
    apps: Sequence[ComposeService],
    file: str,
    out: list[Finding],
) -> None:
    """The backend services of one compose file, and how its sf replicas reach them."""
    report = Reporter(file, out)
    services: Mapping[str, Any] = doc.get("services") or {}
    hosts: dict[str, str] = {}
    for name, svc in services.items():
        if isinstance(svc, Mapping):
            for host in (name, svc.get("container_name"), svc.get("hostname")):
                if host:
                    hosts[str(host)] = str(name)
    for app in apps:
        svc = services.get(app.name) or {}
        raw = raw_mapping(svc.get("environment"))
        depends = _depends_on(svc.get("depends_on"))
        for var, schemes in BACKEND_VARS.items():
            if not app.env.get(var):
                continue  # unset, or `VAR:` with no value: compose passes the shell's through
            where = f"service {app.name}: {var}"
            if inline_password(str(raw.get(var, ""))):
                report.error(
                    f"{where} has its password written in the file; take it from a variable "
                    f"(${{{_PASSWORD_VARS[var]}}} set in an env file or the shell) so the file "
                    f"can be shared and the secret rotated without editing it"
                )
            try:
                url = urlsplit(app.env[var])
                url.port  # noqa: B018  # raises for a port that is not a number
            except ValueError:
                report.error(f"{where} is not a URL that can be parsed (host, port)")
                continue
            if url.scheme.lower() not in schemes:
                report.error(f"{where} is not a {' or '.join(s + '://' for s in schemes)} URL")
                continue
            host = url.hostname
            if not host:
                continue
            if host in _LOCAL:
                report.error(
                    f"{where} points at {host}, the replica's own container: name the "
                    f"database's service instead (e.g. postgres, redis)"
                )
            elif host in hosts:
                _check_dependency(app.name, var, hosts[host], depends, services, report)
            elif "." not in host:
                report.error(
                    f"{where} points at host {host}, but no service of this file is called "
                    f"that: add the service (infra/docker-compose.multihost.yaml has postgres "
                    f"and redis) or give the database's full host name"
                )
    for name, svc in services.items():
        if isinstance(svc, Mapping):
            _check_database(str(name), svc, report)


def _depends_on(value: object) -> dict[str, Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return {str(k): (v if isinstance(v, Mapping) else {}) for k, v in value.items()}
    if isinstance(value, list):
        return {str(v): {"condition": "service_started"} for v in value}
    return {}


def _check_dependency(
    app: str,
    var: str,
    target: str,
    depends: Mapping[str, Mapping[str, Any]],
    services: Mapping[str, Any],
    report: Reporter,
) -> None:
    healthcheck = services[target].get("healthcheck") or {}
    if not healthcheck.get("test") or healthcheck.get("disable") is True:
        report.error(
            f"service {target} (the host of {var} of {app}) has no healthcheck: nothing says "
            f"when it accepts connections, and `condition: service_healthy` cannot hold. Add "
            f"one (pg_isready, redis-cli ping)"
        )
        return
    condition = (depends.get(target) or {}).get("condition")
    if condition != "service_healthy":
        shown = "no depends_on" if target not in depends else f"condition {condition}"
        report.warning(
            f"service {app}: {shown} for {target} (the host of {var}): the replica starts "
            f"before {target} accepts connections, so its start-up recovery fails and is "
            f"retried. Add depends_on: {target}: condition: service_healthy"
        )


def _check_database(name: str, svc: Mapping[str, Any], report: Reporter) -> None:
    """Pinned image, no password in the file, data on a volume, Redis with its AOF."""
    image, tag = _image(svc)
    if image not in ("postgres", "redis"):
        return
    where = f"service {name}"
    if not tag or tag == "latest":
        report.warning(
            f"{where}: image {svc.get('image')} is not pinned to a version; a pull can bring "
            f"a new major version (PostgreSQL does not start on another major's data)"
        )
    targets = [
        str(v.get("target", "")) if isinstance(v, Mapping) else str(v).split(":")[1:2][0]
        for v in svc.get("volumes") or []
        if isinstance(v, Mapping) or ":" in str(v)
    ]
    if image == "postgres":
        password = str(raw_mapping(svc.get("environment")).get("POSTGRES_PASSWORD", ""))
        if _REF.sub("", password):
            report.error(
                f"{where}: POSTGRES_PASSWORD is written in the file; use POSTGRES_PASSWORD_FILE "
                f"with a compose secret, or a ${{VARIABLE}} from an env file"
            )
        if not any(t.startswith("/var/lib/postgresql") for t in targets):
            report.warning(
                f"{where}: no volume at /var/lib/postgresql/data: the delivered records live "
                f"in the container and go with it"
            )
    else:
        command = svc.get("command") or []
        words = command.split() if isinstance(command, str) else [str(c) for c in command]
        if not any(a == "--appendonly" and b == "yes" for a, b in itertools.pairwise(words)):
            report.warning(
                f"{where}: Redis runs without --appendonly yes: a restart loses the session "
                f"events (clients then get `lost` for what they had not read)"
            )


# -- Kubernetes -------------------------------------------------------------------------------
def _sf_containers(pod: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        c
        for c in pod.get("containers") or []
        if any(str(e.get("name", "")).startswith("SF_") for e in c.get("env") or [])
    ]


def check_k8s_storage(docs: Sequence[tuple[str, Mapping[str, Any]]], out: list[Finding]) -> None:
    """Where each workload keeps its state, and the recovery Jobs of orphaned claims."""
    claims: dict[str, list[str]] = {}
    services: dict[str, Mapping[str, Any]] = {}
    for _, doc in docs:
        name = str((doc.get("metadata") or {}).get("name", "?"))
        if doc.get("kind") == "PersistentVolumeClaim":
            claims[name] = list((doc.get("spec") or {}).get("accessModes") or [])
        elif doc.get("kind") == "Service":
            services[name] = doc
    sets: list[tuple[str, dict[str, list[str]], bool]] = []
    jobs: list[tuple[Reporter, str, Mapping[str, Any]]] = []
    for file, doc in docs:
        kind = doc.get("kind")
        if kind not in ("Deployment", "StatefulSet", "ReplicaSet", "Job"):
            continue
        report = Reporter(file, out)
        spec = doc.get("spec") or {}
        pod = (spec.get("template") or {}).get("spec") or {}
        where = f"{kind}/{(doc.get('metadata') or {}).get('name', '?')}"
        for c in _sf_containers(pod):
            for e in c.get("env") or []:
                if e.get("name") in BACKEND_VARS and inline_password(str(e.get("value", ""))):
                    report.error(
                        f"{where}, container {c.get('name')}: {e['name']} has its password "
                        f"in the manifest; take it from a Secret (valueFrom.secretKeyRef)"
                    )
        if kind == "Job":
            jobs.append((report, where, pod))
            continue
        templates = {
            str((t.get("metadata") or {}).get("name")): list(
                (t.get("spec") or {}).get("accessModes") or []
            )
            for t in spec.get("volumeClaimTemplates") or []
        }
        has_db = False
        for c in _sf_containers(pod):
            env = {str(e.get("name")): e for e in c.get("env") or []}
            has_db = has_db or "SF_DATABASE_URL" in env
            state = str((env.get("SF_STATE_DIR") or {}).get("value", "")).rstrip("/")
            if state:
                _check_state_volume(
                    where,
                    kind,
                    spec,
                    pod,
                    c,
                    state,
                    templates,
                    claims,
                    "SF_DATABASE_URL" in env,
                    report,
                )
        if kind == "StatefulSet":
            sets.append((str(doc["metadata"]["name"]), templates, has_db))
            _check_statefulset(where, spec, services, report)
    for report, where, pod in jobs:
        _check_recovery_job(report, where, pod, sets)


def _check_state_volume(
    where: str,
    kind: object,
    spec: Mapping[str, Any],
    pod: Mapping[str, Any],
    container: Mapping[str, Any],
    state: str,
    templates: Mapping[str, list[str]],
    claims: Mapping[str, list[str]],
    has_db: bool,
    report: Reporter,
) -> None:
    cw = f"{where}, container {container.get('name')}"
    mount = next(
        (
            m
            for m in container.get("volumeMounts") or []
            if str(m.get("mountPath", "")).rstrip("/") == state
        ),
        None,
    )
    if mount is None:
        report.error(
            f"{cw}: SF_STATE_DIR {state} is on the container's own filesystem: acknowledged "
            f"writes not yet delivered are lost with the pod. Mount a persistent volume there"
        )
        return
    name = str(mount.get("name"))
    if kind == "StatefulSet":
        if name in templates:
            if has_db and "ReadWriteMany" in templates[name]:
                report.warning(
                    f"{cw}: volumeClaimTemplates {name} is ReadWriteMany; with SF_DATABASE_URL "
                    f"each pod's volume holds only its own queue, so ReadWriteOnce is enough and "
                    f"avoids a network filesystem's weak locks and fsync"
                )
            return
        if has_db:
            report.error(
                f"{cw}: SF_STATE_DIR is on volume {name}, not from volumeClaimTemplates: with "
                f"SF_DATABASE_URL each pod needs its own ReadWriteOnce claim, which the pod "
                f"that replaces it (same ordinal) mounts and recovers"
            )
    volume = _volume(pod, name)
    if "emptyDir" in volume:
        report.error(
            f"{cw}: SF_STATE_DIR {state} is an emptyDir: acknowledged writes not yet delivered "
            f"are lost with the pod. Use a persistent claim (a StatefulSet's volumeClaimTemplates)"
        )
    claim = str((volume.get("persistentVolumeClaim") or {}).get("claimName", ""))
    modes = set(claims.get(claim, []))
    replicas = int(spec.get("replicas", 1))
    if replicas > 1 and modes and "ReadWriteMany" not in modes:
        report.error(
            f"{cw}: {replicas} replicas share the {'/'.join(sorted(modes))} claim {claim}: it "
            f"mounts on one node only, so pods elsewhere stay Pending and a rolling update "
            f"stalls. Use a StatefulSet with volumeClaimTemplates (infra/k8s/multihost/) or a "
            f"ReadWriteMany claim"
        )


def _check_statefulset(
    where: str, spec: Mapping[str, Any], services: Mapping[str, Mapping[str, Any]], report: Reporter
) -> None:
    policy = spec.get("persistentVolumeClaimRetentionPolicy") or {}
    for key in ("whenScaled", "whenDeleted"):
        if policy.get(key) == "Delete":
            report.error(
                f"{where}: persistentVolumeClaimRetentionPolicy.{key} is Delete: a removed "
                f"pod's claim, with the acknowledged records its queue still holds, is deleted "
                f"with it. Keep Retain and empty the claim with the recovery Job"
            )
    governing = str(spec.get("serviceName", ""))
    svc = services.get(governing)
    if governing and svc is not None and (svc.get("spec") or {}).get("clusterIP") != "None":
        report.error(
            f"{where}: serviceName {governing} is not a headless Service (clusterIP: None); "
            f"the pods get no stable DNS names"
        )


def _check_recovery_job(
    report: Reporter,
    where: str,
    pod: Mapping[str, Any],
    sets: Sequence[tuple[str, Mapping[str, list[str]], bool]],
) -> None:
    for c in pod.get("containers") or []:
        argv = [str(a) for a in [*(c.get("command") or []), *(c.get("args") or [])]]
        if not any(a == "queue" and b == "recover" for a, b in itertools.pairwise(argv)):
            continue
        cw = f"{where}, container {c.get('name')}"
        state = _flag(argv, "--state-dir")
        mounts = {
            str(m.get("mountPath", "")).rstrip("/"): m.get("name")
            for m in c.get("volumeMounts") or []
        }
        volume = _volume(pod, mounts.get((state or "").rstrip("/")))
        claim = (volume.get("persistentVolumeClaim") or {}).get("claimName")
        if not claim:
            report.error(
                f"{cw}: queue recover --state-dir {state} is not where a persistentVolumeClaim "
                f"is mounted: the Job recovers nothing. Mount the orphaned claim there"
            )
        elif sets and not any(
            re.fullmatch(rf"{re.escape(t)}-{re.escape(s)}-\d+", str(claim))
            for s, ts, _ in sets
            for t in ts
        ):
            names = ", ".join(f"{t}-{s}-<ordinal>" for s, ts, _ in sets for t in ts)
            report.warning(f"{cw}: claim {claim} is none of the StatefulSet claims ({names})")
        has_db = any(str(e.get("name")) == "SF_DATABASE_URL" for e in c.get("env") or [])
        if any(db for _, _, db in sets) and not has_db:
            report.error(
                f"{cw}: the StatefulSet delivers into SF_DATABASE_URL but this Job has none: "
                f"its records would go into SQLite on the orphaned volume, which nothing reads. "
                f"Give it the same SF_DATABASE_URL (secretKeyRef)"
            )
        if (has_db or any(db for _, _, db in sets)) and _flag(argv, "--app") is None:
            report.error(
                f"{cw}: queue recover without --app delivers into feedback.sqlite3 on the "
                f"orphaned volume, not into the servers' database: name the served app, "
                f"{_RECOVER_HINT}"
            )


def _volume(pod: Mapping[str, Any], name: object) -> Mapping[str, Any]:
    found: Mapping[str, Any] = next(
        (v for v in pod.get("volumes") or [] if v.get("name") == name), {}
    )
    return found


def _flag(argv: Sequence[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == name and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None
