"""Exceptions that carry a gRPC status: raise these from handlers, the interceptor maps them."""

from __future__ import annotations

import grpc


def status_code(number: int) -> grpc.StatusCode:
    """The ``grpc.StatusCode`` of a google.rpc code number (``SessionError.code``, ``SourceStatus.code``); UNKNOWN if none."""
    return next((c for c in grpc.StatusCode if c.value[0] == number), grpc.StatusCode.UNKNOWN)


class StreamHarnessError(Exception):
    code: grpc.StatusCode = grpc.StatusCode.INTERNAL


class InvalidInput(StreamHarnessError):
    """The caller sent something malformed: say exactly what."""

    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(StreamHarnessError):
    code = grpc.StatusCode.NOT_FOUND


class QuotaExceeded(StreamHarnessError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class RateLimited(QuotaExceeded):
    """Over a rate: ``retry_after_s`` says when the next one is taken."""

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooLarge(QuotaExceeded):
    """A message or a field above its size limit (RESOURCE_EXHAUSTED, as gRPC's own limit)."""


class DeadlineExceeded(StreamHarnessError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Unauthenticated(StreamHarnessError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(StreamHarnessError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DependencyUnavailable(StreamHarnessError):
    """A dependency (Kafka, Triton, Qdrant, a model) is not there right now; the caller may retry."""

    code = grpc.StatusCode.UNAVAILABLE


class FailedPrecondition(StreamHarnessError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class SettingsError(Exception):
    """A setting is missing or invalid. The message names the environment variable."""
