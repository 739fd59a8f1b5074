"""Stream keys: every Kafka record is keyed by ``<tenant>/<stream_id>``."""

from __future__ import annotations

import re

from streamharness.errors import InvalidInput
from streamharness.v1 import common_pb2

_NAME = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def validate_name(kind: str, value: str) -> str:
    """Tenant and stream ids end up in Kafka keys, metric labels and Qdrant payloads: keep them plain."""
    if not _NAME.match(value or ""):
        raise InvalidInput(f"{kind} {value!r} is invalid: use 1-128 characters of letters, digits, '.', '_' or '-'")
    return value


def make_key(tenant: str, stream_id: str) -> common_pb2.StreamKey:
    return common_pb2.StreamKey(tenant=validate_name("tenant", tenant), stream_id=validate_name("stream_id", stream_id))


def key_str(key: common_pb2.StreamKey) -> str:
    return f"{key.tenant}/{key.stream_id}"


def parse_key(raw: str | bytes) -> common_pb2.StreamKey:
    text = raw.decode() if isinstance(raw, bytes) else raw
    tenant, sep, stream_id = text.partition("/")
    if not sep:
        raise InvalidInput(f"stream key {text!r} is not of the form <tenant>/<stream_id>")
    return make_key(tenant, stream_id)
