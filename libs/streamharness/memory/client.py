"""The memory service's client for the stages that act for a stream (decision, responder,
summariser): ``MemoryServiceStub``'s ``Context``, ``Recall`` and ``Items`` with, on every call, an
internal identity token for the tenant of the request's stream (:mod:`streamharness.auth`) and the
caller's trace context (memory's span joins the trace of the response or decision asking)."""

from __future__ import annotations

from typing import Any

import grpc

from streamharness.auth import AuthSettings, InternalTokens
from streamharness.settings import load_settings
from streamharness.telemetry import tracing
from streamharness.v1 import memory_pb2, memory_pb2_grpc

AUDIENCE = "memory"


class MemoryClient:
    def __init__(self, address: str, service: str, auth: AuthSettings | None = None, *, options: Any = None) -> None:
        self._tokens = InternalTokens(auth or load_settings(AuthSettings), service)
        self._channel = grpc.insecure_channel(address, options=options)
        self._stub = memory_pb2_grpc.MemoryServiceStub(self._channel)

    def _md(self, request: Any) -> tuple[tuple[str, str], ...]:
        carrier: dict[str, str] = {}
        tracing.inject(carrier)  # traceparent (lower case, as gRPC metadata keys must be)
        return (*self._tokens.metadata(request.key.tenant, AUDIENCE), *carrier.items())

    def Context(self, request: memory_pb2.ContextRequest, timeout: float | None = None) -> memory_pb2.ContextResponse:  # noqa: N802
        return self._stub.Context(request, timeout=timeout, metadata=self._md(request))

    def Recall(self, request: memory_pb2.RecallRequest, timeout: float | None = None) -> memory_pb2.RecallResponse:  # noqa: N802
        return self._stub.Recall(request, timeout=timeout, metadata=self._md(request))

    def Items(self, request: memory_pb2.ItemsRequest, timeout: float | None = None) -> memory_pb2.ItemsResponse:  # noqa: N802
        return self._stub.Items(request, timeout=timeout, metadata=self._md(request))

    def close(self) -> None:
        self._channel.close()
