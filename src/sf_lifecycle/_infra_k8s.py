"""`check-infra` for Kubernetes manifests: grace period, readiness probe, preStop, Service,
and the blue/green twin (candidate pods outside the stable Service, TraefikService weights)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from ._infra_common import (
    CANDIDATE_SUFFIX,
    DELAY_VAR,
    WORKLOAD_KINDS,
    Finding,
    HealthPaths,
    Reporter,
    ceil_s,
    fmt_ms,
    read_budget,
)

__all__ = ["check_k8s"]


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


def check_k8s(docs: Sequence[tuple[str, Mapping[str, Any]]], out: list[Finding]) -> None:
    workload_labels: list[dict[str, str]] = []
    candidates: list[tuple[str, dict[str, str]]] = []
    for file, doc in docs:
        if doc.get("kind") not in WORKLOAD_KINDS or doc.get("kind") == "Job":
            continue  # a Job serves nothing (the recovery Job: `_infra_backends`)
        report = Reporter(file, out)
        spec = _pod_spec(doc)
        if spec is None:
            continue
        where = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name', '?')}"
        template_meta = ((doc.get("spec") or {}).get("template") or {}).get("metadata") or {}
        workload_labels.append(dict(template_meta.get("labels") or {}))
        name = str((doc.get("metadata") or {}).get("name", ""))
        if name.endswith(CANDIDATE_SUFFIX):
            candidates.append((name, workload_labels[-1]))
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
            budget = read_budget(env)
            paths = HealthPaths.from_env(env)  # the container's SF_HEALTH_PREFIX
            for problem in budget.problems:
                report.error(f"{cw}: {problem}")
            pre_s = _prestop_sleep_s(c)
            need_ms = budget.required_ms + pre_s * 1000
            if int(period_s) * 1000 < need_ms:
                extra = f" + preStop sleep ({pre_s} s)" if pre_s else ""
                report.error(
                    f"{cw}: terminationGracePeriodSeconds {period_s} is shorter than "
                    f"{budget.describe()}{extra}: the kubelet would SIGKILL the pod while it "
                    f"still drains. Set it to {ceil_s(need_ms)} or more."
                )
            probe = c.get("readinessProbe")
            if not probe:
                report.error(
                    f"{cw}: no readinessProbe, so nothing takes a draining pod out of rotation "
                    f"except the termination itself. Add httpGet {paths.healthz}, periodSeconds 2, "
                    f"timeoutSeconds 1, failureThreshold 1."
                )
            else:
                path = (probe.get("httpGet") or {}).get("path")
                if path not in paths.readiness:
                    ready = sorted(paths.readiness - {paths.healthz})[0]
                    report.warning(
                        f"{cw}: readinessProbe is not an httpGet of {paths.healthz} (or "
                        f"{ready}); {path or 'it'} does not answer 503 while the pod drains, "
                        f"recovers its queue or fails a readiness check, so traffic reaches it "
                        f"then"
                    )
                period = int(probe.get("periodSeconds", 10)) * 1000
                timeout = int(probe.get("timeoutSeconds", 1)) * 1000
                failures = int(probe.get("failureThreshold", 3))
                if period + timeout > budget.delay_ms:
                    report.error(
                        f"{cw}: readinessProbe periodSeconds + timeoutSeconds "
                        f"({fmt_ms(period)} + {fmt_ms(timeout)}) does not fit inside the drain "
                        f"delay ({DELAY_VAR} = {budget.delay_ms} ms). Use periodSeconds 2, "
                        f"timeoutSeconds 1."
                    )
                elif failures * period + timeout > budget.delay_ms:
                    report.warning(
                        f"{cw}: readinessProbe needs failureThreshold x periodSeconds + "
                        f"timeoutSeconds = {fmt_ms(failures * period + timeout)} to mark the pod "
                        f"unready, longer than the drain delay ({budget.delay_ms} ms); set "
                        f"failureThreshold 1"
                    )
            started = (c.get("startupProbe") or {}).get("httpGet") or {}
            if started.get("path") in paths.readiness:
                report.warning(
                    f"{cw}: startupProbe on {started.get('path')}, which answers 503 until "
                    f"the queue recovery finished and every readiness check passes; a long "
                    f"recovery or a database down at start gets the pod restarted. Use "
                    f"{paths.livez}."
                )
            live = (c.get("livenessProbe") or {}).get("httpGet") or {}
            if live.get("path") in paths.readiness:
                report.warning(
                    f"{cw}: livenessProbe on {live.get('path')}, which answers 503 while "
                    f"starting, draining, recovering and failing checks; a restart then cuts "
                    f"the drain or the recovery short. Use {paths.livez}."
                )
    for file, doc in docs:
        if doc.get("kind") != "Service":
            continue
        report = Reporter(file, out)
        spec = doc.get("spec") or {}
        where = f"Service/{(doc.get('metadata') or {}).get('name', '?')}"
        if spec.get("sessionAffinity") != "ClientIP" and spec.get("clusterIP") != "None":
            report.warning(
                f"{where}: sessionAffinity is not ClientIP; reconnecting SSE clients may land on "
                f"another pod (or use cookie affinity in your ingress)"
            )
        selector = spec.get("selector") or {}
        svc_name = str((doc.get("metadata") or {}).get("name", ""))
        for cand, labels in candidates:
            if (
                selector
                and not svc_name.endswith((CANDIDATE_SUFFIX, f"{CANDIDATE_SUFFIX}-verify"))
                and all(labels.get(k) == v for k, v in selector.items())
            ):
                report.error(
                    f"{where}: selector {selector} also matches the pods of {cand}: the "
                    f"candidate is in the stable pool and takes production traffic before it "
                    f"is verified. Give the candidate's pods their own labels and Service"
                )
        if (
            workload_labels
            and selector
            and not any(
                all(lbls.get(k) == v for k, v in selector.items()) for lbls in workload_labels
            )
        ):
            report.error(f"{where}: selector {selector} matches no pod template given")
    _check_traefik_services(docs, out)


def _check_traefik_services(
    docs: Sequence[tuple[str, Mapping[str, Any]]], out: list[Finding]
) -> None:
    """Weights and sticky cookie of `TraefikService` (Traefik's CRD) weighted services; no
    IngressRoute reaches a weighted child directly (its requests would count in that child's
    metrics with production traffic, which the rollout gate judges)."""
    children: dict[str, str] = {}
    for _, doc in docs:
        if doc.get("kind") == "TraefikService":
            name = str((doc.get("metadata") or {}).get("name", "?"))
            for child in ((doc.get("spec") or {}).get("weighted") or {}).get("services") or []:
                if str(child.get("kind", "Service")) == "Service":
                    children[str(child.get("name"))] = name
    for file, doc in docs:
        if doc.get("kind") != "IngressRoute":
            continue
        where = f"IngressRoute/{(doc.get('metadata') or {}).get('name', '?')}"
        for route in (doc.get("spec") or {}).get("routes") or []:
            for svc in route.get("services") or []:
                ref = str(svc.get("name"))
                if str(svc.get("kind", "Service")) == "Service" and ref in children:
                    Reporter(file, out).error(
                        f"{where}: routes to Service {ref}, a child of TraefikService "
                        f"{children[ref]}: its requests count in the child's metrics with "
                        f"production traffic and hide errors from `sf-lifecycle rollout`. Give "
                        f"the verification route its own Service (e.g. {ref}-verify)"
                    )
    for file, doc in docs:
        if doc.get("kind") != "TraefikService":
            continue
        weighted = (doc.get("spec") or {}).get("weighted")
        if not weighted:
            continue
        report = Reporter(file, out)
        where = f"TraefikService/{(doc.get('metadata') or {}).get('name', '?')}"
        weights = []
        for child in weighted.get("services") or []:
            raw = child.get("weight", 1)
            if isinstance(raw, bool) or not isinstance(raw, int) or raw < 0:
                report.error(
                    f"{where}: weight of {child.get('name')} is {raw!r}, not an integer >= 0"
                )
            else:
                weights.append(raw)
        if weights and sum(weights) == 0:
            report.error(f"{where}: every weight is 0, nothing to route to")
        if not (weighted.get("sticky") or {}).get("cookie"):
            report.warning(
                f"{where}: no sticky cookie; during a rollout a client would flip between "
                f"versions on every request. Add sticky.cookie (name sf-aff)"
            )
