"""The daemon's FastAPI application: routes, error answers, authentication.

Owns :func:`create_app`. Every error is an answer
``{"error": {"code": ..., "message": "one line"}}`` with the HTTP status of
:data:`vmfork.errors.HTTP_ERRORS` (``Retry-After`` with 503 and 429), never a
traceback: a vmfork error keeps its class's code, a request body that does
not fit the schema is ``invalid`` (400), an unknown route ``not_found``, and
anything unexpected ``error`` (500, logged with its traceback on the daemon's
side only). With a token, every request but ``GET /v1/health`` needs
``Authorization: Bearer <token>`` (401 ``unauthorized`` otherwise; compared
in constant time).
"""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException

from vmfork.errors import VmforkError, http_error
from vmfork.service import (
    events,
    forks,
    metrics,
    operations,
    reconcile,
    template_files,
    templates,
    vms,
)
from vmfork.service.state import ServiceState

log = logging.getLogger("vmfork.service")

#: Seconds a client is asked to wait before it retries a request the host
#: could not take now (503, 429).
RETRY_AFTER = 2
#: Routes that need no token.
OPEN_PATHS = frozenset({"/v1/health"})


def error_response(status: int, code: str, message: str) -> JSONResponse:
    """The daemon's answer for an error."""
    line = " ".join(str(message).split())[:1000]
    headers = {"Retry-After": str(RETRY_AFTER)} if status in (429, 503) else None
    return JSONResponse({"error": {"code": code, "message": line}}, status_code=status,
                        headers=headers)


def _first_problem(exc: RequestValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return "invalid request"
    e = errors[0]
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    return f"{where}: {e.get('msg', 'invalid')}" if where else str(e.get("msg", "invalid"))


def create_app(state: ServiceState) -> FastAPI:
    """The REST API v1 application for *state*."""
    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        async with reconcile.background(state):
            yield

    app = FastAPI(title="vmforkd", version="1", lifespan=lifespan,
                  description="vmfork's REST API: VMs, forks, templates, clones, pools.")
    app.state.vmfork = state

    @app.exception_handler(VmforkError)
    async def vmfork_error(_request: Request, exc: VmforkError) -> JSONResponse:
        code, status = http_error(exc)
        return error_response(status, code, str(exc))

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(400, "invalid", _first_problem(exc))

    @app.exception_handler(HTTPException)
    async def http_exception(_request: Request, exc: HTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed", 401: "unauthorized"}.get(
            exc.status_code, "invalid")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return error_response(500, "error", f"unexpected {type(exc).__name__}: {exc}")

    @app.middleware("http")
    async def authenticate(request: Request,
                           call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        token = state.token
        if token is not None and request.url.path not in OPEN_PATHS:
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
                return error_response(401, "unauthorized",
                                      "missing or wrong bearer token (Authorization header)")
        return await call_next(request)

    @app.get("/v1/health")
    async def health() -> dict[str, str]:
        """Answers as soon as the daemon serves (no token needed)."""
        return {"status": "ok"}

    app.include_router(vms.router)
    app.include_router(forks.router)
    app.include_router(templates.router)
    app.include_router(template_files.router)
    app.include_router(operations.router)
    app.include_router(events.router)
    app.include_router(metrics.router)
    return app


__all__ = ["RETRY_AFTER", "create_app", "error_response"]
