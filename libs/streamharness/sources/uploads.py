"""Uploads spooled to local disk, and the per-replica count of pulled streams.

An upload (a Source with ``upload: true``; the client sends the file in chunks) is written to a
temporary file on the ingest replica that serves the call, checked to be a video PyAV reads, then
pulled from there like a file over HTTP (same media time: the frames' presentation times). Bytes
are accounted per tenant on the replica while the file exists, so one tenant cannot fill the disk:
``SH_SOURCE_MAX_UPLOAD_BYTES`` per upload, ``SH_SOURCE_TENANT_MAX_UPLOAD_BYTES`` per tenant.

Uploaded files are opened with FFmpeg restricted to plain video containers and the ``file``
protocol (:data:`UPLOAD_OPEN_OPTIONS`): an uploaded HLS or concat playlist would otherwise make
ingest open the URLs or local files it names.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

from streamharness.errors import FailedPrecondition, InvalidInput, QuotaExceeded, TooLarge
from streamharness.sources.settings import SourceSettings

log = logging.getLogger(__name__)

# Demuxers of self-contained video files (FFmpeg names; "mov" also matches mp4, "matroska" webm).
UPLOAD_FORMATS = "mov,matroska,avi,mpegts,flv,mpeg,mpegvideo,h264,hevc,ogg,asf,mxf,ivf,m4v,mjpeg"
UPLOAD_OPEN_OPTIONS = {"format_whitelist": UPLOAD_FORMATS, "protocol_whitelist": "file"}


class UploadBytes:
    """Bytes of uploads spooled on this replica, per tenant. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._bytes: dict[str, int] = defaultdict(int)

    def reserve(self, tenant: str, count: int, limit: int) -> int | None:
        """Take ``count`` more bytes for ``tenant`` unless that goes over ``limit``; None when taken,
        else the bytes the tenant already holds."""
        with self._lock:
            held = self._bytes[tenant]
            if held + count > limit:
                return held
            self._bytes[tenant] = held + count
            return None

    def release(self, tenant: str, count: int) -> None:
        with self._lock:
            left = self._bytes[tenant] - count
            if left > 0:
                self._bytes[tenant] = left
            else:
                self._bytes.pop(tenant, None)

    def held(self, tenant: str) -> int:
        with self._lock:
            return self._bytes.get(tenant, 0)


# The replica's registry: every UploadSpool made without one shares it.
REPLICA_UPLOAD_BYTES = UploadBytes()


def probe(path: Path) -> None:
    """InvalidInput unless ``path`` is a video container PyAV opens, with a video stream it can decode."""
    import av
    import av.error

    try:
        with av.open(str(path), mode="r", options=dict(UPLOAD_OPEN_OPTIONS)) as container:
            video = container.streams.video
            if not video:
                kinds = ", ".join(sorted({s.type for s in container.streams})) or "no streams"
                raise InvalidInput(f"the upload is not a video PyAV can read: the {container.format.name} file has no video stream ({kinds})")
            if video[0].codec_context is None:
                raise InvalidInput("the upload is not a video PyAV can read: no decoder for its video codec")
    except av.error.FFmpegError as err:
        why = err.strerror or str(err)
        if isinstance(err, av.error.ArgumentError):
            why += f" (only these containers are taken: {UPLOAD_FORMATS})"
        raise InvalidInput(f"the upload is not a video PyAV can read: {why}") from None


class UploadSpool:
    """One upload on its way to disk. ``write`` the chunks, ``finish`` (checks it is a video), pull
    the returned path, then ``close`` (deletes the file, frees the tenant's bytes). A context
    manager: leaving it closes.

    ``declared_bytes`` (the Source's ``upload_bytes``, 0 when unknown) is checked and reserved up
    front, so that an upload that could never be taken is refused before its first chunk."""

    def __init__(self, tenant: str, settings: SourceSettings, declared_bytes: int = 0, *,
                 registry: UploadBytes | None = None) -> None:
        self.tenant = tenant
        self.settings = settings
        self.declared_bytes = int(declared_bytes)
        self.written = 0
        self._registry = registry if registry is not None else REPLICA_UPLOAD_BYTES
        self._reserved = 0
        self._finished: Path | None = None
        self._closed = False
        if self.declared_bytes < 0:
            raise InvalidInput(f"upload_bytes {self.declared_bytes} is negative")
        if self.declared_bytes > settings.max_upload_bytes:
            raise TooLarge(f"the upload declares {self.declared_bytes} bytes, above the limit of {settings.max_upload_bytes} "
                           "(SH_SOURCE_MAX_UPLOAD_BYTES)")
        self._reserve(self.declared_bytes)
        directory = settings.upload_dir
        try:
            if directory is not None:
                Path(directory).mkdir(parents=True, exist_ok=True)
            fd, name = tempfile.mkstemp(prefix="sh-upload-", suffix=".video", dir=directory)
        except OSError:
            self._registry.release(tenant, self._reserved)
            raise
        self.path = Path(name)
        self._file = os.fdopen(fd, "wb")

    def _reserve(self, count: int) -> None:
        if count <= 0:
            return
        held = self._registry.reserve(self.tenant, count, self.settings.tenant_max_upload_bytes)
        if held is not None:
            raise QuotaExceeded(f"tenant {self.tenant!r} has {held} bytes of uploads spooled on this replica; {count} more "
                                f"would pass the limit of {self.settings.tenant_max_upload_bytes} (SH_SOURCE_TENANT_MAX_UPLOAD_BYTES)")
        self._reserved += count

    def write(self, data: bytes) -> None:
        if self._closed or self._finished is not None:
            raise FailedPrecondition("the upload is already finished")
        total = self.written + len(data)
        if total > self.settings.max_upload_bytes:
            raise TooLarge(f"the upload is over {self.settings.max_upload_bytes} bytes (SH_SOURCE_MAX_UPLOAD_BYTES)")
        if self.declared_bytes and total > self.declared_bytes:
            raise InvalidInput(f"the upload sent more than the {self.declared_bytes} bytes it declared (upload_bytes)")
        if total > self._reserved:
            self._reserve(total - self._reserved)
        self._file.write(data)
        self.written = total

    def finish(self) -> Path:
        """Close the file and check it (InvalidInput: empty, shorter than declared, not a video)."""
        if self._closed:
            raise FailedPrecondition("the upload was closed")
        if self._finished is not None:
            return self._finished
        self._file.close()
        if self.written == 0:
            raise InvalidInput("the upload is empty")
        if self.declared_bytes and self.written != self.declared_bytes:
            raise InvalidInput(f"the upload ended after {self.written} of the {self.declared_bytes} bytes it declared (upload_bytes)")
        probe(self.path)
        self._finished = self.path
        return self.path

    def close(self) -> None:
        """Delete the file and give the tenant's bytes back. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(OSError):
            self._file.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._registry.release(self.tenant, self._reserved)
        self._reserved = 0

    def __enter__(self) -> UploadSpool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class PullSlots:
    """Pulled streams on this replica, per tenant and in all. Thread-safe."""

    def __init__(self, settings: SourceSettings) -> None:
        self.settings = settings
        self._lock = threading.Lock()
        self._per_tenant: dict[str, int] = defaultdict(int)
        self._total = 0

    def take(self, tenant: str) -> None:
        """QuotaExceeded (naming the setting) when the tenant or the replica is at its limit."""
        with self._lock:
            mine = self._per_tenant.get(tenant, 0)
            if mine >= self.settings.max_pulled_streams_per_tenant:
                raise QuotaExceeded(f"tenant {tenant!r} already pulls {mine} streams on this ingest replica, its limit "
                                    "(SH_SOURCE_MAX_PULLED_STREAMS_PER_TENANT)")
            if self._total >= self.settings.max_pulled_streams:
                raise QuotaExceeded(f"this ingest replica already pulls {self._total} streams, its limit "
                                    "(SH_SOURCE_MAX_PULLED_STREAMS); try again later")
            self._per_tenant[tenant] = mine + 1
            self._total += 1

    def release(self, tenant: str) -> None:
        with self._lock:
            mine = self._per_tenant.get(tenant, 0)
            if mine <= 0:
                log.warning("PullSlots.release(%r) without a slot taken", tenant)
                return
            if mine == 1:
                del self._per_tenant[tenant]
            else:
                self._per_tenant[tenant] = mine - 1
            self._total -= 1

    @contextlib.contextmanager
    def slot(self, tenant: str) -> Iterator[None]:
        self.take(tenant)
        try:
            yield
        finally:
            self.release(tenant)

    def in_use(self, tenant: str | None = None) -> int:
        with self._lock:
            return self._total if tenant is None else self._per_tenant.get(tenant, 0)
