"""schemathesis fuzzes the API from its own OpenAPI document (the in-process ASGI app, with a
document that has VMs and an event): no 5xx ever, every refusal a 4xx with a message, every
answer as the document describes it, and requests outside the schema refused."""

from __future__ import annotations

import uuid
from typing import Any

import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance

from services.notifier.api import build_api
from services.notifier.document import ScheduledEventsDocument
from services.notifier.service import ScheduledEventsService
from shared.contracts import Event, HostInventory, VMInfo
from tests.test_notifier_document import planned

PUBLISHED: list[Event] = []


async def _publish(event: Event) -> None:
    PUBLISHED.append(event)


def _app() -> Any:
    document = ScheduledEventsDocument()
    service = ScheduledEventsService(document, _publish)
    # Starlette's test client calls from the address "testclient": make it a VM with an event.
    service.apply(
        HostInventory(
            host="h1",
            vms=[VMInfo(vm="vm-1", uuid="u", availability_set="s", ip="testclient", state="r")],
        ),
        1,
    )
    service.apply(planned("h1", uuid.uuid4(), vms=["vm-1"]), 2)
    return build_api(service, long_poll_max_s=0.2)


schema = schemathesis.openapi.from_asgi("/openapi.json", _app())


@schemathesis.check
def refusals_are_4xx_with_a_message(ctx: Any, response: Any, case: Any) -> None:
    """Every answer is 2xx, 304 or a 4xx whose JSON body says what is wrong."""
    status = response.status_code
    assert status < 500, f"server error {status}"
    if status >= 400:
        body = response.json()
        assert isinstance(body.get("error"), str) and body["error"], body


@schema.parametrize()
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
def test_api_never_fails_and_always_explains(case: schemathesis.Case) -> None:
    # A valid request may still be refused (an EventId this VM cannot see, a defer over its
    # limit), so acceptance of every schema-valid request is not expected.
    case.call_and_validate(excluded_checks=[positive_data_acceptance])
