"""Messages taken as bytes and parsed by the handler, so that a malformed one is answered rather
than ending the call (gRPC's own deserializer fails the whole call with "Exception deserializing
request!"). A string field that is not UTF-8 is named by its path, e.g. ``question.text``."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import TypeVar

import grpc

from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import DecodeError, Message

from streamharness.errors import InvalidInput

M = TypeVar("M", bound=Message)


def parse(message_type: type[M], data: bytes, what: str) -> M:
    """``message_type`` from ``data``; ``InvalidInput`` naming the bad field otherwise."""
    try:
        return message_type.FromString(data)
    except DecodeError as err:
        path = invalid_utf8_field(message_type.DESCRIPTOR, data)
        if path is not None:
            raise InvalidInput(f"{what}: field {path} is not valid UTF-8") from None
        raise InvalidInput(f"{what} is not a valid {message_type.DESCRIPTOR.name} ({err})") from None


def _varint(data: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        byte = data[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise ValueError("varint too long")


def invalid_utf8_field(descriptor: Descriptor, data: bytes, prefix: str = "") -> str | None:
    """The dotted path of the first string field of ``data`` that is not UTF-8 (None: none found,
    or the bytes are broken in another way)."""
    i = 0
    try:
        while i < len(data):
            tag, i = _varint(data, i)
            number, wire_type = tag >> 3, tag & 7
            if wire_type == 0:
                _, i = _varint(data, i)
            elif wire_type == 1:
                i += 8
            elif wire_type == 5:
                i += 4
            elif wire_type == 2:
                size, i = _varint(data, i)
                chunk, i = data[i:i + size], i + size
                field = descriptor.fields_by_number.get(number)
                if field is None:
                    continue
                path = f"{prefix}{field.name}"
                if field.type == FieldDescriptor.TYPE_STRING:
                    try:
                        chunk.decode("utf-8")
                    except UnicodeDecodeError:
                        return path
                elif field.type == FieldDescriptor.TYPE_MESSAGE:
                    found = invalid_utf8_field(field.message_type, chunk, f"{path}.")
                    if found is not None:
                        return found
            else:
                return None
    except (IndexError, ValueError):
        return None
    return None


async def drain_first(requests: AsyncIterator[bytes], timeout_s: float = 0.5) -> None:
    """Take the first message a client has most likely sent already, before a call is refused at
    its start: a status that overtakes the client's own write reaches a ``grpc.aio`` client as
    INTERNAL "Internal error from Core" instead of the status sent. Bounded by ``timeout_s``."""
    with contextlib.suppress(TimeoutError, grpc.RpcError, StopAsyncIteration):
        await asyncio.wait_for(anext(requests, None), timeout_s)
