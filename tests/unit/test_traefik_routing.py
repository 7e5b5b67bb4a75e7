"""`TraefikRouting`: the one model the harness renders and `check-infra` reads back."""

from __future__ import annotations

from typing import Any

import pytest

from sf_lifecycle._infra_check import check_documents
from sf_lifecycle._infra_traefik import label_tree
from sf_lifecycle.testing import TraefikRouting

LABELS = {
    "traefik.enable": "true",
    "traefik.http.routers.sf.rule": "Host(`sf.localhost`)",
    "traefik.http.routers.sf.service": "sf",
    "traefik.http.services.sf.loadbalancer.server.port": "4000",
    "traefik.http.services.sf.loadBalancer.healthCheck.path": "/api/healthz",
    "traefik.http.services.sf.loadbalancer.healthcheck.interval": "2000ms",
    "traefik.http.services.sf.loadbalancer.healthcheck.timeout": "1s",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.name": "sf-aff",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.httponly": "true",
    "traefik.http.services.sf.loadbalancer.sticky.cookie.samesite": "lax",
}


def test_what_the_harness_renders_reads_back_as_the_same_routing() -> None:
    r = TraefikRouting()
    lb = r.dynamic_config(["http://127.0.0.1:4000"])["http"]["services"]["sf"]["loadBalancer"]
    assert TraefikRouting.from_load_balancer(lb) == r
    pool = r.bluegreen_config(["http://a:1"], ["http://b:1"])["http"]["services"]["sf"]
    # A blue/green pool has no cookie of its own: the weighted service's pins the client.
    assert TraefikRouting.from_load_balancer(pool["loadBalancer"]).cookie_name is None


def test_labels_and_files_read_into_the_same_drain_fields() -> None:
    lb = label_tree(LABELS)["http"]["services"]["sf"]["loadbalancer"]
    from_labels = TraefikRouting.from_load_balancer(lb, service="sf")
    assert from_labels.drain_fields() == TraefikRouting().drain_fields()
    assert from_labels.drain_fields()["health check interval"] == "2 s"


def test_absent_values_read_as_traefik_defaults_or_none() -> None:
    r = TraefikRouting.from_load_balancer({"servers": [{"url": "http://a:1"}]})
    assert (r.health_path, r.cookie_name, r.cookie_same_site) == (None, None, None)
    assert (r.health_interval_ms, r.health_timeout_ms) == (30_000, 5_000)
    assert TraefikRouting.from_load_balancer({"sticky": {"cookie": {}}}).cookie_name == ""


def test_a_bad_duration_raises_when_read() -> None:
    with pytest.raises(ValueError, match="not a duration"):
        TraefikRouting.from_load_balancer({"healthCheck": {"path": "/x", "interval": "2 sec"}})


def test_sticky_cookie_true_label_is_a_cookie_with_a_generated_name() -> None:
    labels = {k: v for k, v in LABELS.items() if ".sticky." not in k} | {
        "traefik.http.services.sf.loadbalancer.sticky.cookie": "true"
    }
    compose: dict[str, Any] = {
        "services": {
            "sf": {
                "image": "sf",
                "stop_grace_period": "610s",
                "environment": {"SF_PORT": "4000"},
                "labels": labels,
            }
        }
    }
    found = [f.message for f in check_documents([("docker-compose.yaml", compose)])]
    assert found == [
        "service sf, Traefik service sf: sticky cookie (generated) is not httpOnly",
        "service sf, Traefik service sf: sticky cookie (generated) has no sameSite (use lax)",
    ]
