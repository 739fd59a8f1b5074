"""Real media servers for the pulled-source tests: RTSP, RTMP, HLS and HTTP(S) on 127.0.0.1.

- :class:`RtspServer`: our RTSP relay (``tools/rtsp-server``, Go, on gortsplib), built once into
  the cache (``$SH_DEV_CACHE_DIR``) and rebuilt when its source changes; publishers ANNOUNCE/RECORD
  to a path, readers DESCRIBE/SETUP/PLAY it, over TCP or UDP.
- :class:`Publisher`: ``ffmpeg -re`` pushing a video (looped, H.264, a keyframe a second) to an
  RTSP or RTMP URL, like a camera; :meth:`Publisher.kill` is SIGKILL (the camera dies).
- :class:`RtmpServer`: FFmpeg serving RTMP itself (``-listen 1``), to one player.
- :class:`HlsServer`: FFmpeg writing a live HLS playlist (segments deleted as they age), served
  over HTTP. :class:`FileServer`: a folder over HTTP or HTTPS (a self-signed certificate made with
  ``cryptography``), with Range requests, redirects, a rate limit and a one-time drop mid-file.
- :func:`make_no_keyframe_ts`: an H.264 MPEG-TS stream with its keyframes removed (bad input).

Every child process gets ``setpriv --pdeathsig TERM`` (it dies with the test process) and runs
at most ``max_s`` seconds; every server listens on loopback only. Needs ``ffmpeg`` and ``go``.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import http.server
import ipaddress
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping
from fractions import Fraction
from pathlib import Path
from urllib.parse import unquote, urlsplit

from streamharness.devinfra.common import dev_cache_dir, free_port, log_tail, stop_process

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parents[3]
RTSP_SERVER_SOURCE = _REPO_ROOT / "tools" / "rtsp-server"
HOST = "127.0.0.1"


class MediaServerError(RuntimeError):
    """A media server or publisher could not be built, started or reached. The message says why."""


# -- processes ---------------------------------------------------------------------------------
def _spawn(cmd: list[str], log_path: Path, *, stdout=None) -> subprocess.Popen:
    """Start ``cmd`` in its own session, dying with this process (``setpriv --pdeathsig``, which
    execs the command: same pid, so a SIGKILL reaches the command itself)."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv:
        cmd = [setpriv, "--pdeathsig", "TERM", "--", *cmd]
    log_file = open(log_path, "ab")
    try:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=stdout if stdout is not None else log_file,
                                stderr=log_file, start_new_session=True)
    finally:
        log_file.close()  # the child holds its own descriptor


def _need(tool: str, hint: str) -> str:
    path = shutil.which(tool)
    if path is None:
        raise MediaServerError(f"{tool!r} is not on PATH: {hint}")
    return path


def _ffmpeg() -> str:
    return _need("ffmpeg", "the media servers need FFmpeg (make system-deps: apt-get install ffmpeg)")


def video_rate(video: Path) -> float:
    """Frames per second of ``video``'s first video stream (25 if the file does not say)."""
    import av

    with av.open(str(video)) as container:
        rate = container.streams.video[0].average_rate
    return float(rate) if rate else 25.0


def _listening(port: int) -> bool:
    """Whether something listens on TCP ``port`` (read from /proc: connecting would take the one
    connection an ``ffmpeg -listen 1`` serves)."""
    needle = f":{port:04X} "
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if len(fields) > 3 and (fields[1] + " ").endswith(needle) and fields[3] == "0A":
                    return True
    return False


def _free_udp_pair() -> int:
    """An even UDP port whose successor is free too (RTP, RTCP)."""
    for _ in range(200):
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            probe.bind((HOST, 0))
            port = probe.getsockname()[1] & ~1
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as a, socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as b:
                a.bind((HOST, port))
                b.bind((HOST, port + 1))
            return port
        except OSError:
            continue
    raise MediaServerError("found no free pair of UDP ports for RTP/RTCP")


# -- the RTSP server ---------------------------------------------------------------------------
def _source_hash(source: Path) -> str:
    digest = hashlib.sha256()
    for name in ("go.mod", "go.sum", "main.go"):
        digest.update(name.encode() + b"\0" + (source / name).read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build_rtsp_server(source: Path = RTSP_SERVER_SOURCE) -> Path:
    """The rtsp-server binary for the current source, built with ``go build`` into the cache when
    missing (``<cache>/rtsp-server/rtsp-server-<source hash>``); reused while the source is unchanged."""
    source = Path(source)
    out_dir = dev_cache_dir() / "rtsp-server"
    binary = out_dir / f"rtsp-server-{_source_hash(source)}"
    if binary.is_file():
        return binary
    go = _need("go", "building tools/rtsp-server needs Go (https://go.dev/dl)")
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / ".build.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test sessions may build at once
        if binary.is_file():
            return binary
        partial = binary.with_suffix(".partial")
        env = {**os.environ, "CGO_ENABLED": "0"}
        started = time.monotonic()
        proc = subprocess.run([go, "build", "-trimpath", "-o", str(partial), "."], cwd=source, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600, check=False)
        if proc.returncode != 0:
            raise MediaServerError(f"go build of {source} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}")
        partial.replace(binary)
        log.info("built %s in %.1f s", binary, time.monotonic() - started)
    return binary


class RtspServer:
    """tools/rtsp-server on 127.0.0.1: a free TCP port for RTSP, a free UDP pair for RTP/RTCP.

        with RtspServer() as server:
            Publisher(video, server.url("cam")).start()
    """

    def __init__(self, *, read_timeout_s: float = 5.0, start_timeout_s: float = 30.0) -> None:
        self.read_timeout_s = read_timeout_s
        self.start_timeout_s = start_timeout_s
        self.port = 0
        self.rtp_port = 0
        self._proc: subprocess.Popen | None = None
        self._dir: Path | None = None

    @property
    def log_path(self) -> Path:
        assert self._dir is not None
        return self._dir / "rtsp-server.log"

    def url(self, path: str) -> str:
        return f"rtsp://{HOST}:{self.port}/{path.lstrip('/')}"

    def start(self) -> RtspServer:
        binary = build_rtsp_server()
        self._dir = Path(tempfile.mkdtemp(prefix="sh-rtsp-"))
        self.port, self.rtp_port = free_port(HOST), _free_udp_pair()
        cmd = [str(binary), "-port", str(self.port), "-rtp-port", str(self.rtp_port), "-read-timeout", f"{self.read_timeout_s:g}s"]
        self._proc = _spawn(cmd, self.log_path, stdout=subprocess.PIPE)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        deadline = time.monotonic() + self.start_timeout_s
        ready = threading.Event()

        def read() -> None:
            for line in self._proc.stdout:  # type: ignore[union-attr]
                if line.startswith(b"ready"):
                    ready.set()
                    break

        threading.Thread(target=read, daemon=True).start()
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                raise MediaServerError(f"rtsp-server did not start (exit {self._proc.poll()}):\n{log_tail(self.log_path)}")

    def describe(self, path: str, timeout_s: float = 2.0) -> int:
        """The RTSP status code of a DESCRIBE of ``path`` (200 once someone publishes there)."""
        request = f"DESCRIBE {self.url(path)} RTSP/1.0\r\nCSeq: 1\r\nAccept: application/sdp\r\n\r\n".encode()
        with socket.create_connection((HOST, self.port), timeout=timeout_s) as sock:
            sock.sendall(request)
            head = sock.recv(256).decode("latin-1")
        match = re.match(r"RTSP/1\.0 (\d{3})", head)
        return int(match.group(1)) if match else 0

    def wait_published(self, path: str, timeout_s: float = 20.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError):
                if self.describe(path) == 200:
                    return
            time.sleep(0.1)
        raise MediaServerError(f"nobody publishes {self.url(path)} after {timeout_s:g} s:\n{log_tail(self.log_path)}")

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5, "rtsp-server")
            if proc.stdout is not None:
                proc.stdout.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> RtspServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- FFmpeg as a camera --------------------------------------------------------------------------
def _encode_args(video: Path, *, loop: bool, fps: float | None, keyframe_s: float, max_s: float) -> list[str]:
    rate = fps or video_rate(video)
    gop = max(1, round(rate * keyframe_s))
    args = [_ffmpeg(), "-nostdin", "-hide_banner", "-loglevel", "warning", "-re"]
    if loop:
        args += ["-stream_loop", "-1"]
    args += ["-i", str(video), "-an", "-t", f"{max_s:g}"]
    if fps:
        args += ["-r", f"{fps:g}"]
    return args + ["-c:v", "libx264", "-preset", "ultrafast", "-tune", "zerolatency", "-pix_fmt", "yuv420p",
                   "-g", str(gop), "-keyint_min", str(gop)]


class Publisher:
    """``ffmpeg -re`` pushing ``video`` to ``url`` (rtsp:// or rtmp://) until stopped, killed, or
    ``max_s`` passed. ``transport``: RTSP's lower transport, "tcp" or "udp". ``listen`` (RTMP):
    FFmpeg serves the URL itself, to one player (:class:`RtmpServer`)."""

    def __init__(self, video: Path, url: str, *, transport: str = "tcp", loop: bool = True, fps: float | None = None,
                 keyframe_s: float = 1.0, max_s: float = 600.0, listen: bool = False) -> None:
        if transport not in ("tcp", "udp"):
            raise ValueError(f"transport {transport!r}: 'tcp' or 'udp'")
        self.video, self.url, self.transport = Path(video), url, transport
        self.loop, self.fps, self.keyframe_s, self.max_s, self.listen = loop, fps, keyframe_s, max_s, listen
        self._proc: subprocess.Popen | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="sh-publisher-"))
        self.starts = 0

    @property
    def log_path(self) -> Path:
        return self._dir / "ffmpeg.log"

    def command(self) -> list[str]:
        args = _encode_args(self.video, loop=self.loop, fps=self.fps, keyframe_s=self.keyframe_s, max_s=self.max_s)
        scheme = urlsplit(self.url).scheme
        if scheme == "rtsp":
            return args + ["-f", "rtsp", "-rtsp_transport", self.transport, self.url]
        if scheme == "rtmp":
            return args + ["-f", "flv", *(["-listen", "1"] if self.listen else []), self.url]
        raise ValueError(f"cannot publish to {self.url}: rtsp:// or rtmp://")

    def start(self) -> Publisher:
        if self.running:
            return self
        self._proc = _spawn(self.command(), self.log_path)
        self.starts += 1
        return self

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def kill(self) -> None:
        """SIGKILL: the camera dies without a goodbye (no TEARDOWN, the connection just closes)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGKILL)
            self._proc.wait()

    def restart(self) -> Publisher:
        self.kill()
        self._proc = None
        return self.start()

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5, "ffmpeg publisher")

    def log_tail(self) -> str:
        return log_tail(self.log_path, 20, "(no ffmpeg log)")

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Publisher:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class RtmpServer:
    """FFmpeg serving ``video`` over RTMP itself (``-f flv -listen 1``): one player connects, gets
    the stream from its start, and FFmpeg exits when that player leaves."""

    def __init__(self, video: Path, *, path: str = "live/cam", loop: bool = True, max_s: float = 600.0) -> None:
        self.port = free_port(HOST)
        self.path = path.strip("/")
        self._publisher = Publisher(video, self.url, loop=loop, max_s=max_s, listen=True)

    @property
    def url(self) -> str:
        return f"rtmp://{HOST}:{self.port}/{self.path}"

    def start(self, timeout_s: float = 20.0) -> RtmpServer:
        self._publisher.start()
        deadline = time.monotonic() + timeout_s
        while not _listening(self.port):
            if not self._publisher.running or time.monotonic() > deadline:
                raise MediaServerError(f"ffmpeg does not listen on {self.url}:\n{self._publisher.log_tail()}")
            time.sleep(0.05)
        return self

    def stop(self) -> None:
        self._publisher.close()

    def __enter__(self) -> RtmpServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- HTTP ------------------------------------------------------------------------------------------
def self_signed_certificate(directory: Path, host: str = HOST) -> tuple[Path, Path]:
    """(cert.pem, key.pem) for ``host`` and localhost, valid for a day; cert.pem is also the CA a
    client trusts (``SH_SOURCE_CA_FILE``)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "streamharness test server")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host)), x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


class _Handler(http.server.SimpleHTTPRequestHandler):
    """Static files with Range requests (what an MP4 with its index at the end needs), plus the
    test knobs of :class:`FileServer`."""

    server: _Server
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
        log.debug("file server: " + format, *args)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        owner = self.server.owner
        path = unquote(urlsplit(self.path).path)
        owner.requests.append(path)
        if path in owner.redirects:
            self.send_response(302)
            self.send_header("Location", owner.redirects[path])
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        target = (owner.directory / path.lstrip("/")).resolve()
        if owner.directory not in target.parents or not target.is_file():
            self.send_error(404)
            return
        size = target.stat().st_size
        start, end = 0, size - 1
        ranged = self.headers.get("Range", "")
        match = re.fullmatch(r"bytes=(\d+)-(\d*)", ranged.strip())
        if match:
            start = int(match.group(1))
            end = min(int(match.group(2)), size - 1) if match.group(2) else size - 1
            if start >= size:
                self.send_error(416)
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        else:
            self.send_response(200)
        content_type = "application/vnd.apple.mpegurl" if target.suffix == ".m3u8" else "video/mp2t" if target.suffix == ".ts" else "application/octet-stream"
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(end - start + 1))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        drop_offset = owner._drops.get(path)
        me = owner._began(path)
        with open(target, "rb") as src:
            src.seek(start)
            left, sent, began = end - start + 1, 0, time.monotonic()
            while left > 0:
                chunk = src.read(min(left, 64 * 1024))
                if not chunk:
                    break
                at = start + sent
                # Only the path's latest response drops: an earlier one the client left (it seeked
                # elsewhere) may still be writing into a closed socket, and would waste the drop.
                if drop_offset is not None and at < drop_offset <= at + len(chunk) and owner._claim_drop(path, me):
                    self.wfile.write(chunk[: drop_offset - at])
                    self.wfile.flush()
                    self.close_connection = True
                    with contextlib.suppress(OSError):
                        self.connection.shutdown(socket.SHUT_RDWR)
                    return
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    return
                sent += len(chunk)
                left -= len(chunk)
                if owner.rate_bytes_per_s:
                    ahead = began + sent / owner.rate_bytes_per_s - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    owner: FileServer

    def handle_error(self, request, client_address) -> None:
        # A client that hangs up mid-response (a puller reconnecting, stopping) is normal here.
        log.debug("file server: request from %s failed", client_address, exc_info=True)


class FileServer:
    """``directory`` over HTTP (or HTTPS: ``tls=True``, a self-signed certificate whose PEM is
    :attr:`ca_file`) on 127.0.0.1.

    ``redirects``: {path: location} answered 302. ``rate_bytes_per_s``: send no faster (a slow
    stream). ``drop_once``: {path: offset} closes the connection of the first response that gets
    to byte ``offset`` of that file (a download that breaks mid-way; later requests get it whole)."""

    def __init__(self, directory: Path, *, tls: bool = False, redirects: Mapping[str, str] | None = None,
                 rate_bytes_per_s: float | None = None, drop_once: Mapping[str, int] | None = None) -> None:
        self.directory = Path(directory).resolve()
        self.tls = tls
        self.redirects = dict(redirects or {})
        self.rate_bytes_per_s = rate_bytes_per_s
        self._drops = dict(drop_once or {})
        self._latest: dict[str, int] = {}  # path -> serial of its latest response
        self._serial = 0
        self._lock = threading.Lock()
        self.requests: list[str] = []
        self.ca_file: Path | None = None
        self._cert_dir: Path | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    def _began(self, path: str) -> int:
        with self._lock:
            self._serial += 1
            self._latest[path] = self._serial
            return self._serial

    def _claim_drop(self, path: str, serial: int) -> bool:
        with self._lock:
            return self._latest.get(path) == serial and self._drops.pop(path, None) is not None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return self._server.server_address[1]

    def url(self, name: str) -> str:
        return f"{'https' if self.tls else 'http'}://{HOST}:{self.port}/{name.lstrip('/')}"

    def start(self) -> FileServer:
        server = _Server((HOST, 0), _Handler)
        server.owner = self
        if self.tls:
            self._cert_dir = Path(tempfile.mkdtemp(prefix="sh-tls-"))
            cert, key = self_signed_certificate(self._cert_dir)
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(cert, key)
            server.socket = context.wrap_socket(server.socket, server_side=True)
            self.ca_file = cert
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True,
                                        name=f"file-server-{self.port}")
        self._thread.start()
        return self

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._cert_dir is not None:
            shutil.rmtree(self._cert_dir, ignore_errors=True)
            self._cert_dir = None

    def __enter__(self) -> FileServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class HlsServer:
    """FFmpeg writing a live HLS playlist of ``video`` (looped; ``segment_s`` segments, the last
    ``list_size`` listed, older ones deleted) into a temporary folder served over HTTP."""

    def __init__(self, video: Path, *, segment_s: float = 1.0, list_size: int = 6, max_s: float = 600.0) -> None:
        self.video, self.segment_s, self.list_size, self.max_s = Path(video), segment_s, list_size, max_s
        self._dir: Path | None = None
        self._proc: subprocess.Popen | None = None
        self._http: FileServer | None = None

    @property
    def url(self) -> str:
        assert self._http is not None, "start() first"
        return self._http.url("live.m3u8")

    def start(self, timeout_s: float = 30.0) -> HlsServer:
        self._dir = Path(tempfile.mkdtemp(prefix="sh-hls-"))
        cmd = _encode_args(self.video, loop=True, fps=None, keyframe_s=self.segment_s, max_s=self.max_s) + [
            "-f", "hls", "-hls_time", f"{self.segment_s:g}", "-hls_list_size", str(self.list_size),
            "-hls_flags", "delete_segments+omit_endlist", "-hls_segment_filename", str(self._dir / "seg-%05d.ts"),
            str(self._dir / "live.m3u8"),
        ]
        self._proc = _spawn(cmd, self._dir / "ffmpeg.log")
        self._http = FileServer(self._dir).start()
        deadline = time.monotonic() + timeout_s
        playlist = self._dir / "live.m3u8"
        while not (playlist.is_file() and playlist.read_text().count("#EXTINF") >= 2):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                tail = log_tail(self._dir / "ffmpeg.log")
                self.stop()
                raise MediaServerError(f"ffmpeg wrote no HLS playlist within {timeout_s:g} s:\n{tail}")
            time.sleep(0.1)
        return self

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            stop_process(proc, 5, "ffmpeg hls")
        if self._http is not None:
            self._http.stop()
            self._http = None
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __enter__(self) -> HlsServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# -- bad input -------------------------------------------------------------------------------------
def make_no_keyframe_ts(video: Path, out: Path, *, seconds: float = 20.0, gop: int = 10) -> Path:
    """Encode ``seconds`` of ``video`` as H.264 in MPEG-TS with PyAV and leave out every keyframe
    packet (with them the SPS/PPS): a stream whose every packet arrives and none decodes."""
    import av

    with av.open(str(video)) as src, av.open(str(out), mode="w", format="mpegts") as dst:
        in_stream = src.streams.video[0]
        rate = in_stream.average_rate or Fraction(25)
        enc = dst.add_stream("libx264", rate=rate)
        enc.width, enc.height = in_stream.codec_context.width, in_stream.codec_context.height
        enc.pix_fmt = "yuv420p"
        enc.codec_context.gop_size = gop
        enc.codec_context.options = {"preset": "ultrafast", "bframes": "0"}
        limit = int(seconds * float(rate))
        dropped = kept = 0
        for index, frame in enumerate(src.decode(in_stream)):
            if index >= limit:
                break
            frame.pts = index
            frame.time_base = Fraction(1) / rate
            for packet in enc.encode(frame.reformat(format="yuv420p")):
                if packet.is_keyframe:
                    dropped += 1
                    continue
                dst.mux(packet)
                kept += 1
        for packet in enc.encode(None):
            if not packet.is_keyframe:
                dst.mux(packet)
    if dropped == 0 or kept == 0:
        raise MediaServerError(f"{out}: expected keyframes to drop and frames to keep, got {dropped} and {kept}")
    return out
