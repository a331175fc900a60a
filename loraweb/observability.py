"""Middleware that gives each request an id for the logs and counts requests for Prometheus.

Both run first in the middleware chain and work in sync and async chains alike, so under ASGI
they never push a request into Django's one thread for sync code.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.core.signals import request_finished
from django.dispatch import receiver
from django.http import HttpRequest, HttpResponseBase
from prometheus_client import Counter, Histogram

from .logs import set_request_id

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is kept only when it is a plain token: it ends up in every log line of the
# request and in a response header, so anything that could forge log fields or headers is replaced.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")

HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
HTTP_REQUESTS = Counter(
    "loraweb_http_requests",
    "HTTP requests answered, by method, route name and status code.",
    ["method", "route", "status"],
)
HTTP_SECONDS = Histogram(
    "loraweb_http_request_duration_seconds",
    "Seconds until the response was returned (for a stream: until it started), by method, route name and status code.",
    ["method", "route", "status"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


class _SyncAndAsyncMiddleware:
    """Base of a middleware that runs as a coroutine when the chain after it is async."""

    sync_capable = True
    async_capable = True

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponseBase | Awaitable[HttpResponseBase]]) -> None:
        self.get_response = get_response
        self._is_async = iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # noqa: ANN204 - a response or a coroutine
        if self._is_async:
            return self.__acall__(request)
        return self.handle(request)

    def handle(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        raise NotImplementedError


def request_id_for(request: HttpRequest) -> str:
    """Return the client's X-Request-ID when it is a plain token of at most 128 characters, else a new id."""
    header_value = request.headers.get(REQUEST_ID_HEADER, "")
    if SANE_REQUEST_ID.fullmatch(header_value):
        return header_value
    return uuid.uuid4().hex


class RequestIdMiddleware(_SyncAndAsyncMiddleware):
    """Set the request id for the logs of this request (`loraweb.logs`) and return it in X-Request-ID.

    The id stays set after the response leaves the middleware, so Django's own log line about
    an error response and the lines written while a stream is sent carry it too. It is cleared
    when the response is closed (`request_finished`), because sync servers reuse their threads.
    """

    def handle(self, request: HttpRequest) -> HttpResponseBase:
        request_id = self._start(request)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        request_id = self._start(request)
        response = await self.get_response(request)
        response[REQUEST_ID_HEADER] = request_id
        return response

    def _start(self, request: HttpRequest) -> str:
        request_id = request_id_for(request)
        request.request_id = request_id
        set_request_id(request_id)
        return request_id


@receiver(request_finished, dispatch_uid="loraweb.observability.clear_request_id")
def clear_request_id(**_kwargs: object) -> None:
    set_request_id(None)


def route_label(request: HttpRequest) -> str:
    """Return the name of the URL pattern that served `request`; never the raw path, which is unbounded."""
    match = getattr(request, "resolver_match", None)
    if match is not None:
        return match.view_name or match.route
    if request.path.startswith("/" + settings.STATIC_URL.lstrip("/")):
        return "static"
    return "unmatched"


def observe_request(request: HttpRequest, response: HttpResponseBase, started: float) -> None:
    method = request.method if request.method in HTTP_METHODS else "other"
    labels = {"method": method, "route": route_label(request), "status": str(response.status_code)}
    HTTP_REQUESTS.labels(**labels).inc()
    HTTP_SECONDS.labels(**labels).observe(time.perf_counter() - started)


class HttpMetricsMiddleware(_SyncAndAsyncMiddleware):
    """Count each request and its latency by method, route name and status (see HTTP_REQUESTS)."""

    def handle(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = self.get_response(request)
        observe_request(request, response, started)
        return response

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        started = time.perf_counter()
        response = await self.get_response(request)
        observe_request(request, response, started)
        return response
