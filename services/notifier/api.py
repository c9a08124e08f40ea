"""The Azure-compatible Scheduled Events HTTP API (FastAPI), with pausepatch's opt-in extensions.

Strict Azure behaviour unless the request opts in: `extended=true` shows ended events with their
measurements and allows `DeferRequests`; `wait_for_change=true` turns a GET into a long poll.
Every refusal is a 4xx with a JSON body `{"error": "<message>", ...}`, never a 5xx.
"""

import logging
from typing import Annotated, Any, Literal, get_args

from fastapi import Body, FastAPI, Header, Query, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Receive, Scope, Send

from services.notifier.document import API_VERSIONS, LATEST_VERSION
from services.notifier.service import ApiError, DeferRequest, ScheduledEventsService

log = logging.getLogger(__name__)

PATH = "/metadata/scheduledevents"
MAX_BODY_BYTES = 64 * 1024
NEWEST_FIRST = list(reversed(API_VERSIONS))


# ---------------------------------------------------------------- models (for OpenAPI)


class Measurement(BaseModel):
    """Extended view: one VM's measured blackout and clock skew after the resync."""

    Resource: str
    ActualPauseMs: float | None = Field(description="Blackout measured by the host.")
    ForcedResume: bool | None = Field(description="Resumed by the pause budget's deadline.")
    ClockSynced: bool | None = Field(description="The guest clock was set and verified.")
    ClockSyncMethod: str | None = Field(description="host-time, rtc or none.")
    ClockSkewBeforeMs: float | None = Field(description="Guest minus host before the resync.")
    ClockSkewMs: float | None = Field(description="Guest minus host after the resync.")


class Deferral(BaseModel):
    """Extended view: one defer a VM asked for."""

    Resource: str
    DeferSeconds: float


class ScheduledEventModel(BaseModel):
    """One scheduled event. Fields newer than the request's api-version are left out."""

    EventId: str = Field(description="GUID, unchanged across status changes.")
    EventType: Literal["Freeze", "Reboot"]
    ResourceType: Literal["VirtualMachine"]
    Resources: list[str] = Field(description="The VMs impacted: check whether you are listed.")
    EventStatus: Literal["Scheduled", "Started", "Completed", "Canceled"] = Field(
        description="Completed and Canceled appear in the extended view only."
    )
    NotBefore: str = Field(description='RFC 1123 GMT; "" once started.')
    Description: str | None = Field(default=None, description="Since 2019-04-01.")
    EventSource: Literal["Platform", "User"] | None = Field(
        default=None, description="Since 2019-08-01."
    )
    DurationInSeconds: int | None = Field(
        default=None, description="Expected interruption; -1 unknown. Since 2020-07-01."
    )
    StartedAt: str | None = Field(default=None, description="Extended view.")
    EndedAt: str | None = Field(default=None, description="Extended view.")
    Outcome: str | None = Field(default=None, description="Extended view.")
    ApprovedBy: list[str] | None = Field(default=None, description="Extended view.")
    Deferrals: list[Deferral] | None = Field(default=None, description="Extended view.")
    DefersRemaining: int | None = Field(default=None, description="Extended view.")
    MaxDeferSeconds: float | None = Field(default=None, description="Extended view.")
    Measurements: list[Measurement] | None = Field(default=None, description="Extended view.")


class ScheduledEventsDocumentModel(BaseModel):
    """The document a VM reads."""

    DocumentIncarnation: int = Field(description="One more on every change of `Events`.")
    Events: list[ScheduledEventModel]
    Extended: bool | None = Field(default=None, description="Present in the extended view.")


class ErrorModel(BaseModel):
    """Every refusal."""

    model_config = ConfigDict(extra="allow")
    error: str = Field(description="What is wrong with the request.")


class StartRequestModel(BaseModel):
    """One event to approve."""

    model_config = ConfigDict(extra="ignore")
    EventId: str = Field(min_length=1, max_length=100)


class DeferRequestModel(BaseModel):
    """One event to postpone (extended API)."""

    model_config = ConfigDict(extra="ignore")
    EventId: str = Field(min_length=1, max_length=100)
    DeferSeconds: float = Field(gt=0, description="Postponement asked; at most the limit.")


class EventRequests(BaseModel):
    """`{"StartRequests": [{"EventId": ...}]}` approves (Azure); `{"DeferRequests": [{"EventId":
    ..., "DeferSeconds": ...}]}` postpones (extended API, needs `extended=true`)."""

    model_config = ConfigDict(
        extra="ignore",
        json_schema_extra={
            "oneOf": [{"required": ["StartRequests"]}, {"required": ["DeferRequests"]}]
        },
    )
    StartRequests: list[StartRequestModel] | None = Field(
        default=None, min_length=1, max_length=100
    )
    DeferRequests: list[DeferRequestModel] | None = Field(
        default=None, min_length=1, max_length=100
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> "EventRequests":
        if (self.StartRequests is None) == (self.DeferRequests is None):
            raise ValueError("give exactly one of StartRequests or DeferRequests")
        return self


class DeferAnswer(BaseModel):
    """What a defer request obtained (the new NotBefore follows in the document)."""

    EventId: str
    DeferSeconds: float
    DefersRemaining: int


class DeferAnswers(BaseModel):
    """Answer to DeferRequests."""

    DeferRequests: list[DeferAnswer]


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorModel, "description": "Bad header, api-version, parameter or body."},
}


MetadataHeader = Annotated[
    str,
    Header(pattern="^[Tt][Rr][Uu][Ee]$", description="`Metadata: true`, required as by IMDS."),
]
ApiVersionValue = Literal[
    "2017-08-01", "2017-11-01", "2019-01-01", "2019-04-01", "2019-08-01", "2020-07-01"
]
assert get_args(ApiVersionValue) == API_VERSIONS
ApiVersion = Annotated[
    ApiVersionValue,
    Query(alias="api-version", description="Each version returns the fields it documents."),
]
Extended = Annotated[
    bool,
    Query(description="Opt in to pausepatch's extended view (never needed by Azure clients)."),
]


# ---------------------------------------------------------------- helpers


def _error(status: int, message: str, **extra: Any) -> JSONResponse:
    return JSONResponse({"error": message, **extra}, status_code=status)


def _etags(header: str | None) -> set[str]:
    """The entity tags of an `If-None-Match` header (weak ones compared weakly)."""
    if not header:
        return set()
    tags = set()
    for part in header.split(","):
        tag = part.strip()
        tags.add(tag[2:] if tag.startswith("W/") else tag)
    return tags


def _matches(tags: set[str], etag: str) -> bool:
    return "*" in tags or etag in tags


METADATA_MISSING = "Bad request. Required metadata header not specified"


def _version_refusal(given: Any) -> ApiError:
    if not given:
        message = "Bad request. api-version was not specified in the request"
    else:
        message = f"Bad request. api-version {str(given)[:40]!r} is invalid or not supported"
    return ApiError(400, message, **{"newest-versions": NEWEST_FIRST})


def _refuse_proxied(request: Request) -> None:
    # IMDS refuses what a proxy forwarded: a server-side request forgery must not reach it.
    if "x-forwarded-for" in request.headers or "forwarded" in request.headers:
        raise ApiError(
            400, "Bad request. Requests forwarded by a proxy (X-Forwarded-For) are refused"
        )


class BodyLimit:
    """Refuses request bodies above `MAX_BODY_BYTES` (413) before anything reads them."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, value in scope["headers"]:
                if name == b"content-length" and (
                    not value.isdigit() or int(value) > MAX_BODY_BYTES
                ):
                    response = _error(413, f"Request body over {MAX_BODY_BYTES} bytes")
                    await response(scope, receive, send)
                    return
        await self.app(scope, receive, send)


class PlainPolls:
    """The hot path, outside FastAPI's parameter machinery: a plain poll (GET of the document
    with `Metadata: true`, a supported `api-version` and nothing else, as every Azure handler
    sends once a second) is answered from the service's per-scope cache, 200 or 304. Anything
    else, errors included, goes on to the FastAPI routes, which answer it the same way."""

    def __init__(self, app: ASGIApp, service: ScheduledEventsService) -> None:
        self.app = app
        self.service = service

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        version = self._plain_poll(scope)
        if version is None:
            await self.app(scope, receive, send)
            return
        client = scope.get("client")
        caller = self.service.document.caller(client[0] if client else "")
        rendered = self.service.render(caller, version, False)
        etag = rendered.etag.encode()
        headers = [(b"etag", etag), (b"cache-control", b"no-cache")]
        match = next((v for k, v in scope["headers"] if k == b"if-none-match"), None)
        if match is not None and _matches(_etags(match.decode("latin-1")), rendered.etag):
            await send({"type": "http.response.start", "status": 304, "headers": headers})
            await send({"type": "http.response.body", "body": b""})
            return
        headers += [
            (b"content-length", str(len(rendered.body)).encode()),
            (b"content-type", b"application/json"),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": rendered.body})

    @staticmethod
    def _plain_poll(scope: Scope) -> str | None:
        """The api-version of a plain poll, or None when the request is anything else."""
        if scope["type"] != "http" or scope["method"] != "GET" or scope["path"] != PATH:
            return None
        query = scope["query_string"]
        if not query.startswith(b"api-version=") or b"&" in query or b"%" in query:
            return None
        version = query[12:].decode("latin-1")
        if version not in API_VERSIONS:
            return None
        metadata = 0
        for name, value in scope["headers"]:
            if name == b"metadata":
                metadata = metadata + 1 if value.lower() == b"true" else 2
            elif name in (b"x-forwarded-for", b"forwarded"):
                return None
        return version if metadata == 1 else None


# ---------------------------------------------------------------- the app


def build_api(service: ScheduledEventsService, long_poll_max_s: float = 300.0) -> FastAPI:
    """The HTTP app over `service`."""
    api = FastAPI(
        title="pausepatch Scheduled Events",
        description=(
            "Azure IMDS-compatible Scheduled Events for the VMs of a pausepatch fleet. The caller "
            "is identified by its source address. Opt-in extensions: `extended=true` (ended events "
            "with measurements, defers) and `wait_for_change=true` (long poll)."
        ),
        version=LATEST_VERSION,
    )
    api.add_middleware(BodyLimit)
    api.add_middleware(PlainPolls, service=service)

    @api.exception_handler(ApiError)
    async def refused(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, **exc.extra)

    @api.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        where = {tuple(str(p) for p in err.get("loc", ())[:2]) for err in errors}
        if ("header", "metadata") in where:
            return _error(400, METADATA_MISSING)
        if ("query", "api-version") in where:
            refusal = _version_refusal(request.query_params.get("api-version"))
            return _error(400, refusal.message, **refusal.extra)
        problems = [
            f"{'.'.join(str(p) for p in err.get('loc', ()))}: {err.get('msg')}"
            for err in errors[:5]
        ]
        if any(loc[0] == "body" for loc in where):
            return _error(
                400,
                'Bad request. Body must be JSON: {"StartRequests": [{"EventId": "..."}]}',
                detail=problems,
            )
        return _error(400, "Bad request. Invalid parameter", detail=problems)

    @api.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        status = exc.status_code if 400 <= exc.status_code < 500 else 400
        headers = dict(exc.headers or {})
        if status == 405:
            # One route per method on a path: Starlette would name only the first one's.
            allowed = {
                method
                for route in api.routes
                if getattr(route, "path", None) == request.url.path
                for method in getattr(route, "methods", None) or ()
            }
            headers["Allow"] = ", ".join(sorted(allowed))
        return JSONResponse({"error": str(exc.detail)}, status_code=status, headers=headers)

    @api.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Never a 5xx to a VM: a bug is logged and answered as a refusal.
        log.exception("unexpected error serving the Scheduled Events API")
        return _error(400, f"Bad request. The request could not be served ({type(exc).__name__})")

    @api.get(
        PATH,
        summary="The scheduled events the calling VM may see",
        response_model=ScheduledEventsDocumentModel,
        responses={
            **ERRORS,
            304: {"description": "Not modified: the ETag in If-None-Match is still current."},
        },
    )
    async def get_events(
        request: Request,
        metadata: MetadataHeader,
        api_version: ApiVersion,
        extended: Extended = False,
        wait_for_change: Annotated[
            bool,
            Query(
                description="Long poll: answer once the document differs from `last_etag` (or "
                "If-None-Match, or the current one), or after `timeout_sec`."
            ),
        ] = False,
        timeout_sec: Annotated[
            float, Query(gt=0, le=long_poll_max_s, description="Longest wait of a long poll.")
        ] = min(60.0, long_poll_max_s),
        last_etag: Annotated[
            str | None, Query(max_length=200, description="ETag the client already has.")
        ] = None,
        if_none_match: Annotated[
            str | None, Header(description="ETag(s) the client has: 304 while current.")
        ] = None,
    ) -> Response:
        _refuse_proxied(request)
        address = request.client.host if request.client else ""
        known = _etags(if_none_match)
        if wait_for_change:
            seen = known | ({last_etag} if last_etag else set())
            rendered = await service.wait_for_change(
                address, api_version, extended, seen or None, timeout_sec
            )
        else:
            rendered = service.render(service.document.caller(address), api_version, extended)
        headers = {"ETag": rendered.etag, "Cache-Control": "no-cache"}
        if _matches(known, rendered.etag):
            return Response(status_code=304, headers=headers)
        return Response(rendered.body, media_type="application/json", headers=headers)

    @api.post(
        PATH,
        summary="Approve (StartRequests) or, extended API, defer (DeferRequests) events",
        responses={
            200: {
                "model": DeferAnswers,
                "description": "Approved (empty body, as Azure), or the defers obtained.",
            },
            **ERRORS,
            409: {"model": ErrorModel, "description": "Defer refused: started or over limit."},
            413: {"model": ErrorModel, "description": "Body too large."},
        },
    )
    async def post_events(
        request: Request,
        body: Annotated[EventRequests, Body()],
        metadata: MetadataHeader,
        api_version: ApiVersion,
        extended: Extended = False,
    ) -> Response:
        _refuse_proxied(request)
        caller = service.document.caller(request.client.host if request.client else "")
        if body.StartRequests is not None:
            await service.approve(caller, [r.EventId for r in body.StartRequests])
            return Response(status_code=200)
        if not extended:
            raise ApiError(
                400, "Bad request. DeferRequests belong to the extended API: add extended=true"
            )
        answers = await service.defer(
            caller,
            [DeferRequest(r.EventId, r.DeferSeconds) for r in body.DeferRequests or []],
        )
        return JSONResponse(DeferAnswers.model_validate({"DeferRequests": answers}).model_dump())

    @api.get("/healthz", summary="Readiness: the stream position the documents are built to")
    async def healthz() -> dict[str, int]:
        return {"seq": service.document.seq, "handled": service.handled}

    return api
