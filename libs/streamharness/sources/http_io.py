"""HTTP(S) for the puller, with the URL policy applied to every request FFmpeg makes.

FFmpeg's own HTTP client follows redirects wherever they point, and an HLS playlist names its
segments by URL: either would let a public URL lead the puller to a private address. So http(s)
sources are read through PyAV's ``io_open`` hook: every URL FFmpeg opens — the source, each
redirect hop, each playlist reload and segment — goes through :func:`~streamharness.sources.policy.check_url`
first and is fetched with httpx (redirects followed by hand, at most ``SH_SOURCE_MAX_REDIRECTS``).
Seeking uses Range requests when the server offers them (an MP4 whose index is at its end).

A read that fails mid-way is remembered (:attr:`HttpOpener.error`): FFmpeg may report it as the
end of the file, and the puller must tell a dropped download from a finished one. So is a URL the
policy refused (:attr:`HttpOpener.refused`): FFmpeg's HLS demuxer skips a segment it cannot open,
and the puller fails the stream instead.
"""

from __future__ import annotations

import io
import logging
import ssl
import threading
import time
from urllib.parse import urljoin

import httpx

from streamharness.errors import InvalidInput, PermissionDenied
from streamharness.sources.policy import check_url, redact

log = logging.getLogger(__name__)

AVIO_FLAG_WRITE = 2
_SKIP_BYTES = 256 * 1024  # a forward seek shorter than this reads on instead of a new request


class SourceStopped(Exception):
    """The puller was asked to stop while a read was waiting."""


class FirstFrameOverdue(Exception):
    """:attr:`HttpOpener.deadline` passed before the puller decoded a frame (FFmpeg may still be
    probing a stream that never decodes: a read is where it can be stopped)."""


class HttpOpener:
    """PyAV ``io_open`` callable: ``opener(url, flags, options)`` returns a file-like :class:`HttpFile`."""

    def __init__(self, settings, stop: threading.Event | None = None, *, check=check_url) -> None:
        self.settings = settings
        self.stop = stop or threading.Event()
        self.check = check
        self.error: BaseException | None = None  # the first failed read since the last take_error()
        self.refused: PermissionDenied | InvalidInput | None = None  # the first URL the policy refused
        self.opened: list[str] = []  # redacted URLs fetched, in order (logs, tests)
        self.deadline: float | None = None  # time.monotonic() by which a frame must be decoded (puller sets it)
        context = ssl.create_default_context()
        if settings.ca_file is not None:
            context.load_verify_locations(cafile=str(settings.ca_file))
        self._client = httpx.Client(
            timeout=httpx.Timeout(settings.read_timeout_s, connect=settings.connect_timeout_s),
            follow_redirects=False,  # every hop is checked by hand
            trust_env=False,  # a proxy from the environment would connect somewhere we never checked
            verify=context,
            headers={"User-Agent": "streamharness-puller/1"},
        )

    def __call__(self, url: str, flags: int, options: dict) -> HttpFile:
        if flags & AVIO_FLAG_WRITE:
            raise PermissionError(f"{redact(url)}: sources are read, never written")
        return HttpFile(self, url)

    def get(self, url: str, offset: int = 0) -> tuple[httpx.Response, str]:
        """GET ``url`` from ``offset`` (a Range request when > 0), following redirects after checking
        each; returns the streaming response and the URL it came from. OSError on an HTTP error."""
        for _ in range(self.settings.max_redirects + 1):
            if self.stop.is_set():
                raise SourceStopped()
            try:
                shown = self.check(url, self.settings)
            except (PermissionDenied, InvalidInput) as err:
                # FFmpeg may shrug off a failed open (HLS skips a segment): the puller looks here.
                if self.refused is None:
                    self.refused = err
                raise
            headers = {"Range": f"bytes={offset}-"} if offset else {}
            try:
                response = self._client.send(self._client.build_request("GET", url, headers=headers), stream=True)
            except httpx.HTTPError as err:
                raise OSError(f"cannot open {shown}: {_describe(err)}") from None
            self.opened.append(shown)
            if response.is_redirect and "location" in response.headers:
                response.close()
                url = urljoin(url, response.headers["location"])
                continue
            if response.status_code >= 400:
                response.close()
                raise OSError(f"cannot open {shown}: HTTP {response.status_code} {response.reason_phrase}")
            return response, url
        raise OSError(f"cannot open {redact(url)}: more than {self.settings.max_redirects} redirects (SH_SOURCE_MAX_REDIRECTS)")

    def take_error(self) -> BaseException | None:
        error, self.error = self.error, None
        return error

    def close(self) -> None:
        self._client.close()


def _describe(err: BaseException) -> str:
    text = str(err) or type(err).__name__
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text} ({cause})"
    return text


class HttpFile(io.RawIOBase):
    """One resource over HTTP as a readable (and, with Range support, seekable) file.

    Seeking only moves the position; the next read fetches from there (a short step forward is
    read through, a longer one is a Range request). FFmpeg often seeks to the end and back to
    learn a file's size, which therefore costs no request."""

    def __init__(self, opener: HttpOpener, url: str) -> None:
        super().__init__()
        self._opener = opener
        self._pos = 0  # where the reader is
        self._stream_pos = 0  # where the open response is
        self._response, self._url = opener.get(url)
        self._shown = redact(self._url)
        headers = self._response.headers
        self._size = int(headers["content-length"]) if "content-length" in headers and "content-encoding" not in headers else None
        self._ranges = headers.get("accept-ranges", "").lower() == "bytes" and self._size is not None
        self._chunks = self._response.iter_bytes()
        self._pending = memoryview(b"")

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return self._ranges

    def tell(self) -> int:
        return self._pos

    def readinto(self, buffer) -> int:
        if self._opener.stop.is_set():
            raise SourceStopped()
        if self._opener.deadline is not None and time.monotonic() > self._opener.deadline:
            raise FirstFrameOverdue()
        if self._size is not None and self._pos >= self._size:
            return 0
        if self._stream_pos != self._pos:
            self._reposition()
        n = self._read_stream(buffer)
        self._pos += n
        return n

    def _read_stream(self, buffer) -> int:
        while not self._pending:
            try:
                self._pending = memoryview(next(self._chunks))
            except StopIteration:
                if self._size is not None and self._stream_pos < self._size:
                    self._fail(OSError(f"{self._shown} ended after {self._stream_pos} of {self._size} bytes"))
                return 0
            except httpx.HTTPError as err:
                self._fail(OSError(f"reading {self._shown} failed after {self._stream_pos} bytes: {_describe(err)}"))
        n = min(len(buffer), len(self._pending))
        buffer[:n] = self._pending[:n]
        self._pending = self._pending[n:]
        self._stream_pos += n
        return n

    def _reposition(self) -> None:
        skip = self._pos - self._stream_pos
        if 0 < skip <= _SKIP_BYTES or (skip > 0 and not self._ranges):
            self._discard(skip)
            return
        if not self._ranges:
            raise OSError(f"{self._shown}: the server does not take Range requests; cannot seek back")
        self._response.close()
        self._response, _ = self._opener.get(self._url, self._pos)
        self._chunks = self._response.iter_bytes()
        self._pending = memoryview(b"")
        self._stream_pos = self._pos
        if self._response.status_code != 206:  # the server ignored the range: read up to it
            self._stream_pos = 0
            self._discard(self._pos)

    def _fail(self, err: OSError) -> None:
        if self._opener.error is None:
            self._opener.error = err
        raise err

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_CUR:
            offset += self._pos
        elif whence == io.SEEK_END:
            if self._size is None:
                raise OSError(f"{self._shown}: size unknown, cannot seek from its end")
            offset += self._size
        if offset < 0:
            raise OSError(f"{self._shown}: seek to {offset}")
        if offset < self._stream_pos and not self._ranges:
            raise OSError(f"{self._shown}: the server does not take Range requests; cannot seek back")
        self._pos = offset
        return offset

    def _discard(self, count: int) -> None:
        scratch = memoryview(bytearray(min(count, 64 * 1024)))
        while count > 0:
            n = self._read_stream(scratch[: min(count, len(scratch))])
            if n == 0:
                break
            count -= n

    def close(self) -> None:
        if not self.closed:
            self._response.close()
        super().close()
