"""Middleware of the project itself."""

from __future__ import annotations

from asgiref.sync import iscoroutinefunction, markcoroutinefunction, sync_to_async
from django.http import HttpRequest, HttpResponseBase
from whitenoise.middleware import WhiteNoiseMiddleware


class AsyncWhiteNoiseMiddleware(WhiteNoiseMiddleware):
    """WhiteNoise's static file middleware, usable in both sync and async middleware chains.

    Django runs a sync-only middleware under ASGI through `sync_to_async`, and everything
    after it through `async_to_sync`, so each request, a long completion included, would hold
    Django's one thread for sync code. Here a request that is not for a static file goes on to
    the next async handler directly.
    """

    sync_capable = True
    async_capable = True

    def __init__(self, get_response=None, settings=None) -> None:  # noqa: ANN001 - Django's signature
        if settings is None:
            super().__init__(get_response)
        else:
            super().__init__(get_response, settings=settings)
        self._is_async = get_response is not None and iscoroutinefunction(get_response)
        if self._is_async:
            markcoroutinefunction(self)

    def __call__(self, request: HttpRequest):  # noqa: ANN204 - a response or a coroutine
        if self._is_async:
            return self.__acall__(request)
        return super().__call__(request)

    async def __acall__(self, request: HttpRequest) -> HttpResponseBase:
        if self.autorefresh:
            static_file = await sync_to_async(self.find_file, thread_sensitive=False)(request.path_info)
        else:
            static_file = self.files.get(request.path_info)
        if static_file is not None:
            return await sync_to_async(self.serve, thread_sensitive=False)(static_file, request)
        return await self.get_response(request)
