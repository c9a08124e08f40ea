"""The Azure-compatible Scheduled Events HTTP API (FastAPI)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.notifier.document import API_VERSIONS, ScheduledEvent, ScheduledEventsDocument

PATH = "/metadata/scheduledevents"


class StartRequest(BaseModel):
    """One event to approve."""

    model_config = ConfigDict(extra="ignore")
    EventId: str = Field(min_length=1, max_length=100)


class StartRequests(BaseModel):
    """The approval body: `{"StartRequests": [{"EventId": "..."}]}`."""

    model_config = ConfigDict(extra="ignore")
    StartRequests: list[StartRequest] = Field(min_length=1, max_length=100)


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def build_api(
    document: ScheduledEventsDocument,
    approve: Callable[[ScheduledEvent, str], Awaitable[None]],
) -> FastAPI:
    """The HTTP app over `document`; `approve(event, vm)` publishes the approval."""
    api = FastAPI(
        title="pausepatch Scheduled Events",
        description="Azure IMDS-compatible Scheduled Events for the VMs of a pausepatch fleet.",
        version="2020-07-01",
    )

    @api.exception_handler(RequestValidationError)
    async def bad_request(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "Bad request", detail=str(exc.errors()[:3]))

    @api.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail))

    def check(request: Request) -> JSONResponse | None:
        if request.headers.get("Metadata", "").lower() != "true":
            return _error(400, "Bad request. Required metadata header not specified")
        if "X-Forwarded-For" in request.headers:
            return _error(400, "Bad request. Requests with X-Forwarded-For are refused")
        version = request.query_params.get("api-version")
        if version not in API_VERSIONS:
            return _error(
                400,
                "Bad request. Missing or unsupported api-version",
                newest_versions=list(reversed(API_VERSIONS)),
            )
        return None

    def caller_address(request: Request) -> str:
        return request.client.host if request.client else ""

    @api.get(PATH, summary="The scheduled events the calling VM may see")
    async def get_events(request: Request) -> Response:
        refusal = check(request)
        if refusal is not None:
            return refusal
        caller = document.caller(caller_address(request))
        body = document.render(caller, request.query_params["api-version"])
        etag = document.etag(body)
        if request.headers.get("If-None-Match") == etag:
            return Response(status_code=304, headers={"ETag": etag})
        return JSONResponse(body, headers={"ETag": etag})

    @api.post(PATH, summary="Approve (start) scheduled events")
    async def start_events(request: Request) -> Response:
        refusal = check(request)
        if refusal is not None:
            return refusal
        try:
            body = StartRequests.model_validate_json(await request.body())
        except ValidationError as exc:
            return _error(
                400,
                'Bad request. Body must be {"StartRequests": [{"EventId": ...}]}',
                detail=str(exc.errors()[:3]),
            )
        caller = document.caller(caller_address(request))
        events = []
        for item in body.StartRequests:
            event = document.approvable(caller, item.EventId)
            if event is None:
                return _error(400, f"Bad request. Unknown EventId {item.EventId}")
            events.append(event)
        assert caller is not None
        for event in events:
            await approve(event, caller.vm)
        return Response(status_code=200)

    return api
