"""The AsyncAPI documents of the bus (docs/asyncapi/) are what `faststream docs gen` makes of the
services' apps today, and they show what each service consumes, with the contract's schemas."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import yaml

from shared import subjects
from shared.devstack import REPO

DOCS = REPO / "docs" / "asyncapi"
HOST = "HOST"
"""The host name the per-host subjects are generated for."""


def document(service: str) -> dict[str, Any]:
    return yaml.safe_load((DOCS / f"{service}.yaml").read_text())  # type: ignore[no-any-return]


def addresses(service: str) -> set[str]:
    return {channel["address"] for channel in document(service)["channels"].values()}


def test_documents_are_regenerated_from_the_apps() -> None:
    result = subprocess.run(
        [sys.executable, str(DOCS / "generate.py"), "--check"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr


def test_documents_show_what_each_service_consumes_with_contract_schemas() -> None:
    assert addresses("planner") >= {
        subjects.host_inventory(),
        subjects.host_approved(),
        subjects.host_deferred(),
        subjects.host_paused(),
        subjects.host_patched(),
        subjects.host_completed(),
        subjects.host_clock(),
        *(subjects.rollout_command(v) for v in ("submit", "get", "list", "halt", "abort")),
    }
    assert addresses("clock-sync") == {subjects.vm_resumed()}
    assert addresses("host-agent") == {
        subjects.host_started(HOST),
        subjects.host_clock_command(HOST),
    }
    schemas = document("host-agent")["components"]["schemas"]
    assert {"MaintenanceStarted", "ClockAction", "PatchSpec"} <= set(schemas)
    for service in ("planner", "notifier", "clock-sync", "host-agent"):
        servers = document(service)["servers"]
        assert servers["development"]["host"] == "nats:4222"


def test_the_notifier_document_shows_its_subscriptions() -> None:
    assert addresses("notifier") == {
        subjects.HOST_AND_ROLLOUT_EVENTS,
        subjects.vm_paused(),
        subjects.vm_clock(),
    }
    schemas = document("notifier")["components"]["schemas"]
    assert {"HostClockSynced", "MaintenanceCompleted", "HostInventory"} <= set(schemas)
    assert "ClockSynced" not in schemas and "VMResumed" not in schemas
