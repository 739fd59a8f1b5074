"""Pulled sources against real servers on 127.0.0.1: our Go RTSP relay (gortsplib) fed by an
``ffmpeg -re`` publisher over TCP and UDP, FFmpeg serving RTMP, a live HLS playlist, and video
files over HTTP and HTTPS. Every server is loopback-only, so the tests allow private networks."""

from __future__ import annotations

import shutil
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest

from streamharness.devinfra.media import FileServer, HlsServer, Publisher, RtmpServer, RtspServer, make_no_keyframe_ts
from streamharness.devinfra.common import free_port
from streamharness.media import read_video, sample_path
from streamharness.sources import Puller, SourceSettings, UploadBytes, UploadSpool
from streamharness.v1 import common_pb2

pytestmark = pytest.mark.integration
S = common_pb2.SourceStatus
UNAVAILABLE, INVALID_ARGUMENT, PERMISSION_DENIED = (c.value[0] for c in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.PERMISSION_DENIED))

if shutil.which("ffmpeg") is None or shutil.which("go") is None:
    pytest.skip("the media servers need ffmpeg and go (make system-deps)", allow_module_level=True)


def settings(**extra) -> SourceSettings:
    values = dict(allow_private_networks=True, connect_timeout_s=5, read_timeout_s=3, first_frame_timeout_s=8,
                  reconnect_initial_s=0.2, reconnect_max_s=0.5, give_up_after_s=30)
    return SourceSettings(**(values | extra))


@dataclass
class Pull:
    """A puller running in a thread, with what it emitted and when (monotonic wall time)."""

    puller: Puller
    frames: list[tuple[int, float]] = field(default_factory=list)  # (media_ts_ms, wall)
    statuses: list[tuple[common_pb2.SourceStatus, float]] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None
    started: float = 0.0

    def start(self) -> Pull:
        self.started = time.monotonic()
        self.thread = threading.Thread(target=self.puller.run, daemon=True,
                                       args=(lambda ts, rgb: self.frames.append((ts, time.monotonic())),
                                             lambda st: self.statuses.append((st, time.monotonic())), self.stop))
        self.thread.start()
        return self

    def wait_for(self, predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not predicate():
            assert time.monotonic() < deadline, f"no {what} after {timeout_s:g} s; statuses: {self.kinds()}"
            time.sleep(0.05)

    def wait_frames(self, n: int, timeout_s: float = 20.0) -> None:
        self.wait_for(lambda: len(self.frames) >= n, timeout_s, f"{n} frames")

    def join(self, timeout_s: float = 30.0) -> float:
        assert self.thread is not None
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), f"the puller did not return within {timeout_s:g} s; statuses: {self.kinds()}"
        return time.monotonic() - self.started

    def finish(self, timeout_s: float = 10.0) -> float:
        self.stop.set()
        return self.join(timeout_s)

    def kinds(self) -> list[str]:
        return [S.Kind.Name(s.kind) for s, _ in self.statuses]

    def media(self) -> list[int]:
        return [ts for ts, _ in self.frames]

    def last(self) -> common_pb2.SourceStatus:
        return self.statuses[-1][0]


def pull(url: str, fps: float = 2.0, *, settings_: SourceSettings | None = None, **source) -> Pull:
    return Pull(Puller(common_pb2.Source(url=url, **source), fps, settings_ or settings())).start()


@pytest.fixture(scope="module")
def vtest() -> Path:
    return sample_path("vtest.avi")  # opencv-doc's street scene, 10 fps, 79.5 s


@pytest.fixture(scope="module")
def rtsp_server():
    with RtspServer() as server:
        yield server


@pytest.fixture(scope="module")
def clips(tmp_path_factory, vtest) -> Path:
    """A folder of files to serve: opencv-doc's vtest.avi and cup.mp4, a 3 s H.264 MP4 (index at the
    end, as ffmpeg writes it: the puller must seek with Range requests) and a no-keyframe MPEG-TS."""
    folder = tmp_path_factory.mktemp("clips")
    for name in ("vtest.avi", "cup.mp4"):
        shutil.copy(sample_path(name), folder / name)
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(vtest), "-t", "3", "-an", "-c:v", "libx264",
                    "-preset", "ultrafast", "-g", "10", str(folder / "clip.mp4")], check=True, timeout=60)
    make_no_keyframe_ts(vtest, folder / "nokey.ts", seconds=20)
    return folder


def reference(path: Path, fps: float) -> list[int]:
    return [frame.media_ts_ms for frame in read_video(path, fps)]


def assert_at_decision_rate(media: list[int], fps: float) -> None:
    """One frame in each 1/fps slot of media time: none twice, none (of a 10 fps source) skipped."""
    assert media == sorted(set(media)), "media time must strictly increase"
    slots = [int(ts // (1000 / fps)) for ts in media]
    assert slots == list(range(slots[0], slots[0] + len(slots))), media


# -- RTSP: a camera that dies and comes back ---------------------------------------------------------
@pytest.mark.parametrize("transport", ["tcp", "udp"])
def test_rtsp_frames_come_at_the_decision_rate_and_a_killed_publisher_shows_as_a_gap(rtsp_server, vtest, transport):
    path = f"cam-{transport}"
    publisher = Publisher(vtest, rtsp_server.url(path), transport=transport).start()
    try:
        rtsp_server.wait_published(path)
        p = pull(rtsp_server.url(path), 2.0, rtsp_transport=transport)
        p.wait_frames(7)
        assert p.kinds()[0] == "KIND_CONNECTED" and f"{transport})" in p.statuses[0][0].message
        before = p.media()
        assert before[0] == 0
        assert_at_decision_rate(before, 2.0)

        publisher.kill()  # SIGKILL: no TEARDOWN; the relay drops the path and its readers
        killed = time.monotonic()
        p.wait_for(lambda: "KIND_RECONNECTING" in p.kinds(), 10, "RECONNECTING")
        time.sleep(max(0.0, 3.0 - (time.monotonic() - killed)))
        publisher.restart()
        p.wait_for(lambda: "KIND_GAP" in p.kinds(), 20, "GAP")
        n = len(p.frames)
        p.wait_frames(n + 4)
        p.finish()
    finally:
        publisher.close()

    kinds = p.kinds()
    first_reconnect, gap_at = kinds.index("KIND_RECONNECTING"), kinds.index("KIND_GAP")
    assert kinds[gap_at - 1] == "KIND_CONNECTED" and set(kinds[first_reconnect:gap_at - 1]) == {"KIND_RECONNECTING"}
    attempts = [s.attempt for s, _ in p.statuses if s.kind == S.KIND_RECONNECTING]
    assert attempts == list(range(1, len(attempts) + 1))
    gap, gap_wall = p.statuses[gap_at]
    # The outage as the frames saw it: wall time from the last frame before the drop to the first after.
    last_before = max(w for ts, w in p.frames if ts < gap.media_ts_ms)
    first_after = min(w for ts, w in p.frames if ts >= gap.media_ts_ms)
    outage_ms = (first_after - last_before) * 1000
    assert gap.gap_ms >= 2500  # at least the 3 s the publisher was dead, less the last frame's slot
    assert abs(gap.gap_ms - outage_ms) < 1500, (gap.gap_ms, outage_ms)
    media = p.media()
    assert media == sorted(set(media))
    assert gap.media_ts_ms in media  # the first frame back is sampled: its slot was empty
    assert_at_decision_rate([ts for ts in media if ts >= gap.media_ts_ms], 2.0)


def test_a_source_offline_past_the_give_up_fails_unavailable(rtsp_server, vtest):
    publisher = Publisher(vtest, rtsp_server.url("gives-up")).start()
    try:
        rtsp_server.wait_published("gives-up")
        p = pull(rtsp_server.url("gives-up"), 1.0, settings_=settings(give_up_after_s=2))
        p.wait_frames(1)
        publisher.kill()
        elapsed_from = time.monotonic()
        p.join(15)
    finally:
        publisher.close()
    assert p.kinds()[-1] == "KIND_FAILED" and "KIND_RECONNECTING" in p.kinds()
    failed = p.last()
    assert failed.code == UNAVAILABLE and "offline for 2 s (SH_SOURCE_GIVE_UP_AFTER_S" in failed.message
    assert time.monotonic() - elapsed_from < 6


def test_an_unreachable_url_fails_unavailable_after_the_connect_window():
    url = f"rtsp://admin:secret@127.0.0.1:{free_port()}/nobody"
    p = pull(url, settings_=settings(connect_timeout_s=1.5))
    took = p.join(10)
    assert p.kinds() == ["KIND_FAILED"] and took < 5
    failed = p.last()
    assert failed.code == UNAVAILABLE
    assert failed.message.startswith(f"cannot open rtsp://127.0.0.1:{url.rsplit(':', 1)[1].split('/')[0]}/nobody: Connection refused")
    assert "SH_SOURCE_CONNECT_TIMEOUT_S" in failed.message and "secret" not in failed.message
    assert failed.url == url.replace("admin:secret@", "")


def test_a_path_nobody_publishes_fails_with_the_servers_answer(rtsp_server):
    p = pull(rtsp_server.url("nobody-here"), settings_=settings(connect_timeout_s=1))
    p.join(10)
    assert p.kinds() == ["KIND_FAILED"] and "404 Not Found" in p.last().message and p.last().code == UNAVAILABLE


# -- RTMP and HLS -----------------------------------------------------------------------------------
def test_rtmp_served_by_ffmpeg(vtest):
    with RtmpServer(vtest) as server:
        p = pull(server.url, 2.0)
        p.wait_frames(6)
        p.finish()
    assert p.kinds()[0] == "KIND_CONNECTED" and p.media()[0] == 0
    assert_at_decision_rate(p.media(), 2.0)


def test_a_live_hls_playlist(vtest):
    with HlsServer(vtest) as server:
        p = pull(server.url, 2.0)
        p.wait_frames(8)
        p.finish()
    assert p.kinds()[0] == "KIND_CONNECTED" and p.media()[0] == 0
    assert p.puller.live is True  # no ENDLIST: live media time, not a file's
    assert_at_decision_rate(p.media(), 2.0)


# -- files over HTTP(S) -----------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["vtest.avi", "cup.mp4", "clip.mp4"])
def test_an_http_file_gives_the_frames_read_video_gives(clips, name):
    # box.mp4 is left out on purpose: its decoder returns frames out of presentation order; the
    # puller reorders them (a few frames' buffer) while read_video clamps each timestamp to after
    # the previous one, so their sampled timestamps differ on that damaged file.
    with FileServer(clips) as server:
        p = pull(server.url(name), 1.0, speed=0)
        took = p.join(30)
    assert p.kinds() == ["KIND_CONNECTED", "KIND_ENDED"]
    assert p.media() == reference(clips / name, 1.0)
    duration_s = p.media()[-1] / 1000
    if duration_s > 60:  # vtest.avi's 79 s: speed 0 is as fast as it decodes, far from real time
        assert took < duration_s / 4
    assert p.last().frames == len(p.frames)


def test_https_at_speed_one_plays_in_real_time(clips):
    with FileServer(clips, tls=True) as server:
        p = pull(server.url("clip.mp4"), 2.0, settings_=settings(ca_file=server.ca_file), speed=1)
        took = p.join(30)
    assert p.kinds() == ["KIND_CONNECTED", "KIND_ENDED"]
    assert p.media() == reference(clips / "clip.mp4", 2.0)
    last_s = p.media()[-1] / 1000
    assert last_s - 0.3 < took < last_s + 1.5
    first_ts, first_wall = p.frames[0]
    for ts, wall in p.frames:  # each frame when its media time says, not all at once
        assert wall - first_wall == pytest.approx((ts - first_ts) / 1000, abs=0.6)


def test_https_with_an_untrusted_certificate_is_refused(clips):
    with FileServer(clips, tls=True) as server:
        p = pull(server.url("clip.mp4"), settings_=settings(connect_timeout_s=1))
        p.join(10)
    assert p.kinds() == ["KIND_FAILED"] and "CERTIFICATE_VERIFY_FAILED" in p.last().message


def test_an_http_file_that_drops_mid_way_resumes_without_a_gap(clips):
    size = (clips / "vtest.avi").stat().st_size
    with FileServer(clips, drop_once={"/vtest.avi": size // 2}) as server:
        p = pull(server.url("vtest.avi"), 1.0)
        p.join(30)
        requests = list(server.requests)
    kinds = p.kinds()
    assert kinds[:3] == ["KIND_CONNECTED", "KIND_RECONNECTING", "KIND_CONNECTED"] and kinds[-1] == "KIND_ENDED"
    assert "KIND_GAP" not in kinds
    assert "ended after" in p.statuses[1][0].message or "failed after" in p.statuses[1][0].message
    assert p.media() == reference(clips / "vtest.avi", 1.0)
    assert len(requests) >= 2


def test_a_redirect_to_a_forbidden_address_is_refused(clips):
    with FileServer(clips) as server:
        server.redirects["/moved.mp4"] = f"http://127.0.0.2:{server.port}/clip.mp4"
        only_this_server = settings(allow_private_networks=False, allowed_networks="127.0.0.1/32")
        p = pull(server.url("moved.mp4"), settings_=only_this_server)
        p.join(10)
    assert p.kinds() == ["KIND_FAILED"]
    assert p.last().code == PERMISSION_DENIED and "127.0.0.2 is a loopback address" in p.last().message


def test_a_stream_without_keyframes_fails_within_the_first_frame_timeout(clips):
    ts = clips / "nokey.ts"
    with FileServer(clips, rate_bytes_per_s=ts.stat().st_size / 20) as server:  # trickled like a live stream
        p = pull(server.url("nokey.ts"), settings_=settings(first_frame_timeout_s=2))
        took = p.join(15)
    assert p.kinds() == ["KIND_FAILED"] and took < 5
    failed = p.last()
    assert failed.code == INVALID_ARGUMENT
    assert "no decodable video frame within 2 s" in failed.message and "SH_SOURCE_FIRST_FRAME_TIMEOUT_S" in failed.message


# -- uploads ---------------------------------------------------------------------------------------
def test_an_upload_gives_the_same_frames_as_the_file_over_http(clips, tmp_path):
    video = (clips / "vtest.avi").read_bytes()
    with FileServer(clips) as server:
        over_http = pull(server.url("vtest.avi"), 1.0)
        over_http.join(30)
    with UploadSpool("acme", settings(upload_dir=tmp_path), declared_bytes=len(video), registry=UploadBytes()) as spool:
        for start in range(0, len(video), 256 * 1024):
            spool.write(video[start:start + 256 * 1024])
        path = spool.finish()
        upload = Pull(Puller(common_pb2.Source(upload=True, upload_bytes=len(video)), 1.0, settings(), path=path)).start()
        upload.join(30)
    assert not path.exists()
    assert upload.kinds() == ["KIND_CONNECTED", "KIND_ENDED"]
    assert upload.media() == over_http.media() == reference(clips / "vtest.avi", 1.0)
