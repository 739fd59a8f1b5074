"""Map exceptions raised by handlers to gRPC status codes with a useful message, log each call,
record its duration, and trace unary calls (a SERVER span continuing the caller's trace from the
W3C ``traceparent`` in the call's metadata: memory's ``Context``/``Recall`` in the trace of the
response asking; :class:`~streamharness.memory.client.MemoryClient` sends it). Streaming calls (a
session's ``Stream``, ``IngestFrames``) last as long as a session and get no span: each frame
carries a trace of its own (:mod:`streamharness.telemetry.tracing`). Handlers raise ``streamharness.errors`` exceptions; anything else is a
bug and becomes INTERNAL (logged with its traceback, but only its type reaches the client).

The server is ``grpc.aio`` (:mod:`streamharness.runner`): ``async`` handlers (the gateway's and
ingest's sessions) run on its event loop, plain ones (memory's queries) in its thread pool. The
interceptor wraps each kind in a wrapper of the same kind. A call the client cancelled is logged
at INFO without a traceback: leaving is not an error.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
import grpc.aio
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from streamharness.errors import StreamHarnessError
from streamharness.telemetry import meters, tracing

log = logging.getLogger("streamharness.grpc")
_tracer = trace.get_tracer("streamharness.grpc")


@contextmanager
def server_span(method: str, metadata: Iterable[tuple[str, Any]] | None) -> Iterator[Span]:
    """The SERVER span of one unary call (``/package.Service/Method``), a child of the caller's
    context when the metadata carries one (OpenTelemetry RPC conventions)."""
    service, _, name = method.lstrip("/").partition("/")
    carrier = {k: v for k, v in (metadata or ()) if isinstance(v, str)}
    with _tracer.start_as_current_span(f"{service}/{name}", context=tracing.extract(carrier), kind=SpanKind.SERVER,
                                       attributes={"rpc.system": "grpc", "rpc.service": service, "rpc.method": name}) as span:
        yield span


def status_of(method: str, exc: BaseException) -> tuple[grpc.StatusCode, str]:
    """The status a handler's exception becomes (logged here, once)."""
    if isinstance(exc, StreamHarnessError):
        code, message = exc.code, str(exc) or exc.__class__.__name__
        log.info("%s -> %s: %s", method, code.name, message)
    elif isinstance(exc, ValueError):
        code, message = grpc.StatusCode.INVALID_ARGUMENT, str(exc)
        log.info("%s -> INVALID_ARGUMENT: %s", method, message)
    else:
        code, message = grpc.StatusCode.INTERNAL, f"internal error ({exc.__class__.__name__}); see server logs"
        log.error("%s failed", method, exc_info=exc)
    return code, message


def _already_aborted(exc: BaseException) -> bool:
    # context.abort() raises after setting the status (AbortError on grpc.aio); let it through untouched.
    return isinstance(exc, grpc.aio.AbortError) or (type(exc) is Exception and not exc.args)


def _cancelled(exc: BaseException) -> bool:
    return isinstance(exc, asyncio.CancelledError | GeneratorExit)


class ErrorMappingInterceptor(grpc.aio.ServerInterceptor):
    async def intercept_service(self, continuation: Callable[..., Awaitable[Any]], details: grpc.HandlerCallDetails) -> Any:
        handler = await continuation(details)
        if handler is None:
            return None
        method = details.method

        def record(start: float, status: str) -> None:
            meters.rpc_duration().record(time.perf_counter() - start, {"rpc.method": method, "rpc.status": status})
            log.debug("%s %s in %.1f ms", method, status, 1e3 * (time.perf_counter() - start))

        def failed(start: float, exc: BaseException) -> tuple[grpc.StatusCode, str] | None:
            """Record a call that raised: the status to abort it with, or None to re-raise as it is
            (a client that left, logged at INFO; a call the handler aborted itself)."""
            if _cancelled(exc):
                record(start, "CANCELLED")
                log.info("%s: the client cancelled the call", method)
                return None
            record(start, "ERROR")
            return None if _already_aborted(exc) else status_of(method, exc)

        def wrap_unary(fn: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.iscoroutinefunction(fn):
                async def ainner(request_or_iter: Any, context: grpc.aio.ServicerContext) -> Any:
                    start = time.perf_counter()
                    with server_span(method, context.invocation_metadata()) as span:
                        try:
                            result = await fn(request_or_iter, context)
                            record(start, "OK")
                            return result
                        except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                            if (status := failed(start, exc)) is None:
                                raise
                            span.set_attribute("rpc.grpc.status_code", status[0].value[0])
                    await context.abort(*status)
                return ainner

            def inner(request_or_iter: Any, context: grpc.ServicerContext) -> Any:
                start = time.perf_counter()
                with server_span(method, context.invocation_metadata()) as span:
                    try:
                        result = fn(request_or_iter, context)
                        record(start, "OK")
                        return result
                    except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                        if (status := failed(start, exc)) is None:
                            raise
                        span.set_attribute("rpc.grpc.status_code", status[0].value[0])
                context.abort(*status)
            return inner

        def wrap_stream(fn: Callable[..., Any]) -> Callable[..., Any]:
            if inspect.isasyncgenfunction(fn):
                async def ainner(request_or_iter: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                    start = time.perf_counter()
                    try:
                        async for item in fn(request_or_iter, context):
                            yield item
                        record(start, "OK")
                    except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                        if (status := failed(start, exc)) is None:
                            raise
                        await context.abort(*status)
                return ainner

            def inner(request_or_iter: Any, context: grpc.ServicerContext) -> Iterator[Any]:
                start = time.perf_counter()
                try:
                    yield from fn(request_or_iter, context)
                    record(start, "OK")
                except BaseException as exc:  # noqa: BLE001 - mapped to a status below
                    if (status := failed(start, exc)) is None:
                        raise
                    context.abort(*status)
            return inner

        if handler.unary_unary:
            return grpc.unary_unary_rpc_method_handler(
                wrap_unary(handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary:
            return grpc.stream_unary_rpc_method_handler(
                wrap_unary(handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            return grpc.unary_stream_rpc_method_handler(
                wrap_stream(handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            wrap_stream(handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )


def message_size_options(max_bytes: int) -> list[tuple[str, int]]:
    """Frames are large: set both directions explicitly (the gRPC default receive limit is 4 MiB)."""
    return [("grpc.max_receive_message_length", max_bytes), ("grpc.max_send_message_length", max_bytes)]
