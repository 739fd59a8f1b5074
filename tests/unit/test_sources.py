"""Pulled sources without servers: the URL policy (every refusal and what it says), redaction,
upload spooling limits, the per-replica pulled-stream slots, media time on made-up timestamps,
and the puller's reconnect loop over a fake PyAV container."""

from __future__ import annotations

import io
import ipaddress
import socket
import threading
import wave
from fractions import Fraction

import grpc
import numpy as np
import pytest

from streamharness.errors import DependencyUnavailable, InvalidInput, PermissionDenied, QuotaExceeded, SettingsError, TooLarge
from streamharness.ingest.frames import Resampler
from streamharness.media import sample_path
from streamharness.settings import load_settings
from streamharness.sources import (
    FileTimeline,
    LiveTimeline,
    PullSlots,
    Puller,
    Sampler,
    SourceSettings,
    UploadBytes,
    UploadSpool,
    check_url,
    redact,
)
from streamharness.sources import puller as puller_module
from streamharness.sources.timeline import ReorderBuffer
from streamharness.v1 import common_pb2

S = common_pb2.SourceStatus
PUBLIC = "8.8.8.8"


def resolver_for(*addresses: str):
    """A getaddrinfo stand-in: every name resolves to ``addresses``."""

    def resolve(host, port, type=0):  # noqa: A002 - getaddrinfo's keyword
        return [(socket.AF_INET6 if ":" in a else socket.AF_INET, socket.SOCK_STREAM, 6, "", (a, port)) for a in addresses]

    return resolve


def failing_resolver(errno: int, text: str):
    def resolve(host, port, type=0):  # noqa: A002
        raise socket.gaierror(errno, text)

    return resolve


# -- the URL policy ----------------------------------------------------------------------------
@pytest.mark.parametrize("url", ["file:///etc/passwd", "gopher://example.org/", "ftp://example.org/v.mp4",
                                 "data:video/mp4;base64,AAAA", "srt://example.org:9000"])
def test_a_scheme_outside_the_allowed_list_is_refused_naming_the_setting(url):
    with pytest.raises(InvalidInput, match=r"source scheme '\w+' is not allowed .*SH_SOURCE_ALLOWED_SCHEMES") as err:
        check_url(url, SourceSettings(), resolver=resolver_for(PUBLIC))
    assert err.value.code == grpc.StatusCode.INVALID_ARGUMENT


def test_a_known_scheme_switched_off_by_the_setting_is_refused():
    settings = SourceSettings(allowed_schemes="rtsp,rtsps")
    with pytest.raises(InvalidInput, match=r"'https' is not allowed \(allowed: rtsp, rtsps; SH_SOURCE_ALLOWED_SCHEMES\)"):
        check_url("https://example.org/v.mp4", settings, resolver=resolver_for(PUBLIC))
    assert check_url("rtsp://cam.example.org/s", settings, resolver=resolver_for(PUBLIC)) == "rtsp://cam.example.org/s"


@pytest.mark.parametrize(("url", "message"), [
    ("", "has no url"),
    ("cam.example.org/stream", "has no scheme"),
    ("rtsp:///stream", "has no host"),
    ("http://user:pw@/x", "has no host"),
    ("http://example.org:99999/x", "cannot be parsed"),
    ("http://example.org/a b.mp4", "contains a space"),
    ("http://example.org\\@127.0.0.1/", "backslash"),
    ("http://example.org/\x00", "control character"),
])
def test_a_malformed_url_is_invalid_input(url, message):
    with pytest.raises(InvalidInput, match=message):
        check_url(url, SourceSettings(), resolver=resolver_for(PUBLIC))


@pytest.mark.parametrize(("address", "what"), [
    ("127.0.0.1", "a loopback address"),
    ("127.8.9.10", "a loopback address"),
    ("10.1.2.3", r"a private address \(RFC 1918\)"),
    ("172.16.5.4", r"a private address \(RFC 1918\)"),
    ("192.168.1.1", r"a private address \(RFC 1918\)"),
    ("169.254.169.254", r"a link-local address \(the cloud metadata endpoint\)"),
    ("169.254.10.1", "a link-local address"),
    ("100.64.0.1", r"a carrier-grade NAT address \(RFC 6598\)"),
    ("0.0.0.0", "an unspecified address"),
    ("224.0.0.251", "a multicast address"),
    ("255.255.255.255", "a reserved address"),
    ("::1", "a loopback address"),
    ("::", "an unspecified address"),
    ("fe80::1", "a link-local address"),
    ("fd00:ec2::254", r"a unique local address \(ULA\)"),
    ("::ffff:10.0.0.1", r"a private address \(RFC 1918\), as 10.0.0.1 inside an IPv6 address"),
    ("64:ff9b::a9fe:a9fe", r"the cloud metadata endpoint\), as 169.254.169.254 inside an IPv6 address"),
    ("2002:7f00:1::", "a loopback address, as 127.0.0.1 inside an IPv6 address"),
])
def test_every_forbidden_address_class_is_refused_naming_both_settings(address, what):
    with pytest.raises(PermissionDenied, match=what) as err:
        check_url("rtsp://cam.example.org/stream", SourceSettings(), resolver=resolver_for(address))
    text = str(err.value)
    assert f"resolves to {ipaddress.ip_address(address)}," in text
    assert "SH_SOURCE_ALLOW_PRIVATE_NETWORKS" in text and "SH_SOURCE_ALLOWED_NETWORKS" in text
    assert err.value.code == grpc.StatusCode.PERMISSION_DENIED


def test_a_literal_address_in_any_spelling_is_judged_after_resolution():
    # getaddrinfo reads "2130706433" and "0x7f.1" as 127.0.0.1, as FFmpeg's own resolver does.
    for url in ("http://2130706433/x", "http://0x7f.1/x", "http://[::1]/x", "http://127.1/x"):
        with pytest.raises(PermissionDenied, match="a loopback address"):
            check_url(url, SourceSettings())


def test_one_forbidden_address_among_several_refuses_the_host():
    with pytest.raises(PermissionDenied, match="10.0.0.5"):
        check_url("rtsp://cam.example.org/s", SourceSettings(), resolver=resolver_for(PUBLIC, "10.0.0.5"))


def test_allowed_networks_let_private_cameras_in_and_nothing_else():
    settings = SourceSettings(allowed_networks="10.20.0.0/16, fd12::/16")
    assert check_url("rtsp://cam/s", settings, resolver=resolver_for("10.20.3.4")) == "rtsp://cam/s"
    assert check_url("rtsp://cam/s", settings, resolver=resolver_for("fd12::7"))
    with pytest.raises(PermissionDenied, match="10.21.0.1"):
        check_url("rtsp://cam/s", settings, resolver=resolver_for("10.21.0.1"))
    with pytest.raises(PermissionDenied, match="metadata"):
        check_url("http://x/", settings, resolver=resolver_for("169.254.169.254"))


def test_allow_private_networks_opens_every_class_but_denied_networks_win():
    settings = SourceSettings(allow_private_networks=True, denied_networks="169.254.169.254/32,8.8.8.0/24")
    assert check_url("http://127.0.0.1:8080/v.mp4", settings)
    for address in ("169.254.169.254", PUBLIC):
        with pytest.raises(PermissionDenied, match=r"in 169\.254\.169\.254/32 of SH_SOURCE_DENIED_NETWORKS|in 8\.8\.8\.0/24 of SH_SOURCE_DENIED_NETWORKS"):
            check_url("http://h/", settings, resolver=resolver_for(address))


def test_denied_networks_beat_allowed_networks():
    settings = SourceSettings(allowed_networks="10.0.0.0/8", denied_networks="10.9.0.0/16")
    with pytest.raises(PermissionDenied, match="SH_SOURCE_DENIED_NETWORKS"):
        check_url("rtsp://cam/s", settings, resolver=resolver_for("10.9.1.1"))


def test_an_unresolvable_host_is_invalid_input_and_a_dns_outage_is_unavailable():
    with pytest.raises(InvalidInput, match="cannot resolve the source host 'nope.invalid': Name or service not known"):
        check_url("rtsp://nope.invalid/s", SourceSettings(), resolver=failing_resolver(socket.EAI_NONAME, "Name or service not known"))
    with pytest.raises(DependencyUnavailable, match="right now"):
        check_url("rtsp://cam.example.org/s", SourceSettings(), resolver=failing_resolver(socket.EAI_AGAIN, "Temporary failure"))


def test_a_public_host_passes_and_the_result_is_redacted():
    shown = check_url("rtsp://admin:s3cret@cam.example.org:8554/live", SourceSettings(), resolver=resolver_for(PUBLIC))
    assert shown == "rtsp://cam.example.org:8554/live"


@pytest.mark.parametrize(("url", "shown"), [
    ("rtsp://admin:s3cret@cam.example.org/live", "rtsp://cam.example.org/live"),
    ("rtsp://admin@cam.example.org:554/live", "rtsp://cam.example.org:554/live"),
    ("http://u:p@[2001:db8::1]:8080/v.mp4", "http://[2001:db8::1]:8080/v.mp4"),
    ("https://cdn.example.org/v.m3u8?token=abc&quality=hd", "https://cdn.example.org/v.m3u8?token=***&quality=hd"),
    ("https://cdn.example.org/v.mp4?X-Amz-Signature=f00&X-Amz-Credential=k", "https://cdn.example.org/v.mp4?X-Amz-Signature=***&X-Amz-Credential=***"),
    ("https://cdn.example.org/v.mp4#t=10", "https://cdn.example.org/v.mp4"),
    ("http://user:pw@host:notaport/x", "http://…"),
])
def test_redact_removes_credentials(url, shown):
    assert redact(url) == shown
    assert "s3cret" not in redact(url) and "pw" not in redact(url)


def test_bad_settings_fail_naming_the_variable():
    with pytest.raises(SettingsError, match="SH_SOURCE_ALLOWED_NETWORKS.*'10.0.0.0/33'"):
        load_settings(SourceSettings, allowed_networks="10.0.0.0/33")
    with pytest.raises(SettingsError, match="SH_SOURCE_ALLOWED_SCHEMES names file"):
        load_settings(SourceSettings, allowed_schemes="rtsp,file")
    with pytest.raises(SettingsError, match="SH_SOURCE_RECONNECT_INITIAL_S"):
        load_settings(SourceSettings, reconnect_initial_s=20, reconnect_max_s=10)


# -- uploads -------------------------------------------------------------------------------------
def small_limits(tmp_path, **extra) -> SourceSettings:
    return SourceSettings(max_upload_bytes=4096, tenant_max_upload_bytes=6144, upload_dir=tmp_path / "spool", **extra)


def test_an_upload_declared_over_the_limit_is_refused_before_a_file_exists(tmp_path):
    with pytest.raises(TooLarge, match="declares 5000 bytes, above the limit of 4096 .SH_SOURCE_MAX_UPLOAD_BYTES") as err:
        UploadSpool("acme", small_limits(tmp_path), declared_bytes=5000, registry=UploadBytes())
    assert err.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert not (tmp_path / "spool").exists() or not any((tmp_path / "spool").iterdir())


def test_an_upload_that_grows_over_the_limit_is_refused(tmp_path):
    with UploadSpool("acme", small_limits(tmp_path), registry=UploadBytes()) as spool:
        spool.write(b"x" * 4000)
        with pytest.raises(TooLarge, match="SH_SOURCE_MAX_UPLOAD_BYTES"):
            spool.write(b"x" * 200)


def test_a_tenants_uploads_together_are_bounded_and_freed_on_close(tmp_path):
    registry, settings = UploadBytes(), small_limits(tmp_path)
    first = UploadSpool("acme", settings, declared_bytes=4000, registry=registry)
    with pytest.raises(QuotaExceeded, match=r"tenant 'acme' has 4000 bytes of uploads spooled .*\(SH_SOURCE_TENANT_MAX_UPLOAD_BYTES\)"):
        UploadSpool("acme", settings, declared_bytes=3000, registry=registry)  # reserved up front
    second = UploadSpool("acme", settings, registry=registry)  # size unknown: counted as it arrives
    second.write(b"y" * 2000)
    with pytest.raises(QuotaExceeded, match="SH_SOURCE_TENANT_MAX_UPLOAD_BYTES"):
        second.write(b"y" * 500)
    other = UploadSpool("globex", settings, declared_bytes=4000, registry=registry)  # not acme's quota
    other.close()
    path = first.path
    assert path.exists()
    first.close()
    assert not path.exists() and registry.held("acme") == 2000
    second.write(b"y" * 500)  # room again
    second.close()
    assert registry.held("acme") == 0


def test_an_upload_must_send_what_it_declared(tmp_path):
    with UploadSpool("acme", small_limits(tmp_path), declared_bytes=100, registry=UploadBytes()) as spool:
        with pytest.raises(InvalidInput, match="more than the 100 bytes it declared"):
            spool.write(b"x" * 101)
        spool.write(b"x" * 50)
        with pytest.raises(InvalidInput, match="ended after 50 of the 100 bytes"):
            spool.finish()
    with UploadSpool("acme", small_limits(tmp_path), registry=UploadBytes()) as spool, pytest.raises(InvalidInput, match="empty"):
        spool.finish()


def _wav_bytes() -> bytes:
    buf = io.BytesIO()
    with wave.open(buf, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(8000)
        out.writeframes(b"\x00\x01" * 8000)
    return buf.getvalue()


@pytest.mark.parametrize(("data", "why"), [
    (b"this is a text file, not a video\n" * 20, "the upload is not a video PyAV can read: Invalid data"),
    (_wav_bytes(), "the upload is not a video PyAV can read: .*only these containers are taken|has no video stream"),
    (b"#EXTM3U\n#EXT-X-TARGETDURATION:10\n#EXTINF:10,\nhttp://169.254.169.254/latest/meta-data\n#EXT-X-ENDLIST\n",
     "the upload is not a video PyAV can read"),  # a playlist would make ingest open the URLs it names
])
def test_an_upload_that_is_not_a_readable_video_is_refused(tmp_path, data, why):
    with UploadSpool("acme", SourceSettings(upload_dir=tmp_path), registry=UploadBytes()) as spool:
        spool.write(data)
        with pytest.raises(InvalidInput, match=why):
            spool.finish()


def test_a_real_video_upload_is_spooled_checked_and_deleted_on_close(tmp_path):
    video = sample_path("cup.mp4").read_bytes()
    registry = UploadBytes()
    spool = UploadSpool("acme", SourceSettings(upload_dir=tmp_path), declared_bytes=len(video), registry=registry)
    for start in range(0, len(video), 64 * 1024):
        spool.write(video[start:start + 64 * 1024])
    path = spool.finish()
    assert path.read_bytes() == video and path.parent == tmp_path
    assert registry.held("acme") == len(video)
    spool.close()
    assert not path.exists() and registry.held("acme") == 0


# -- slots ----------------------------------------------------------------------------------------
def test_pull_slots_bound_a_tenant_and_the_replica():
    slots = PullSlots(SourceSettings(max_pulled_streams_per_tenant=2, max_pulled_streams=3))
    slots.take("acme")
    slots.take("acme")
    with pytest.raises(QuotaExceeded, match="tenant 'acme' already pulls 2 streams .*SH_SOURCE_MAX_PULLED_STREAMS_PER_TENANT"):
        slots.take("acme")
    slots.take("globex")
    with pytest.raises(QuotaExceeded, match="already pulls 3 streams, its limit .SH_SOURCE_MAX_PULLED_STREAMS."):
        slots.take("initech")
    slots.release("acme")
    with slots.slot("initech"):
        assert slots.in_use() == 3 and slots.in_use("initech") == 1
    assert slots.in_use() == 2 and slots.in_use("acme") == 1


# -- media time -----------------------------------------------------------------------------------
def test_sampling_keeps_the_first_frame_of_each_slot_like_ingests_resampler():
    timestamps = [0, 40, 480, 520, 990, 1010, 1499, 1500, 2600, 2601]
    sampler, resampler = Sampler(2.0), Resampler(2.0)
    kept = [ts for ts in timestamps if sampler.keep(ts)]
    assert kept == [0, 520, 1010, 1500, 2600]
    assert kept == [ts for ts in timestamps if resampler.keep(ts)]
    with pytest.raises(InvalidInput, match="decision_fps"):
        Sampler(0)


def test_file_media_time_is_the_presentation_time_and_a_resume_skips_what_was_seen():
    tl = FileTimeline()
    placed = [tl.place(ts) for ts in (0, 100, 200, 300)]
    assert [p.media_ts_ms for p in placed] == [0, 100, 200, 300] and placed[0].first_of_connection
    assert tl.place(300) is None and tl.place(250) is None and tl.place(None) is None  # repeated, back, no time
    tl.reconnected()
    # Resumed from the keyframe before the drop: what was decoded already is skipped, no gap.
    assert [tl.place(ts) for ts in (100, 200, 300)] == [None, None, None]
    resumed = tl.place(400)
    assert resumed.first_of_connection and resumed.gap_ms == 0
    tl.reconnected()
    jumped = tl.place(1000)  # frames 500..900 are not coming back: that is a real gap
    assert jumped.first_of_connection and jumped.gap_ms == 600


def test_live_media_time_starts_at_zero_follows_pts_and_shows_an_outage_as_a_gap():
    tl = LiveTimeline(jump_ms=10_000)
    wall = 1000.0
    first = tl.place(90_000_123, wall)  # whatever the camera's clock says, the stream starts at 0
    assert (first.media_ts_ms, first.first_of_connection) == (0, True)
    assert [tl.place(90_000_123 + d, wall + d / 1000).media_ts_ms for d in (100, 200, 300)] == [100, 200, 300]
    tl.reconnected()
    back = tl.place(5, wall + 3.3)  # a new connection, the camera's clock restarted: 3.3 s of wall time later
    assert (back.media_ts_ms, back.gap_ms, back.first_of_connection) == (3300, 3000, True)
    assert tl.place(105, wall + 3.4).media_ts_ms == 3400


def test_live_media_time_strictly_increases_when_the_wall_clock_lags_the_pts():
    tl = LiveTimeline()
    tl.place(0, 0.0)
    assert tl.place(2000, 0.5).media_ts_ms == 2000  # a burst: the pts ran ahead of the wall clock
    tl.reconnected()
    back = tl.place(0, 1.0)  # wall time says 1000 ms, already passed: one ms after the last frame
    assert back.media_ts_ms == 2001 and back.gap_ms == 1


def test_live_pts_that_jump_within_a_connection_reanchor_on_wall_time():
    tl = LiveTimeline(jump_ms=10_000)
    tl.place(50_000, 0.0)
    tl.place(50_100, 0.1)
    assert tl.place(1_000, 0.2).media_ts_ms == 200  # clock went back: wall time
    assert tl.place(1_100, 0.3).media_ts_ms == 300
    assert tl.place(900_000, 0.4).media_ts_ms == 400  # clock leapt 15 minutes in 100 ms: wall time
    assert tl.place(None, 0.9).media_ts_ms == 900  # no timestamp at all: wall time


def test_reorder_buffer_restores_presentation_order():
    decoded = [0, 101, 67, 134, 34, 234, 201, 267, 167, 367]  # opencv-doc box.mp4's decoder output order
    buf = ReorderBuffer(depth=4)
    out = [ts for ts in decoded for ts, _ in buf.push(ts, ts)] + [ts for ts, _ in buf.drain()]
    assert out == sorted(decoded)


# -- the puller's loop, over a fake PyAV container ---------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class FakeFrame:
    width, height = 8, 8

    def __init__(self, pts: int) -> None:
        self.pts, self.dts = pts, pts

    def to_ndarray(self, format: str) -> np.ndarray:  # noqa: A002 - PyAV's keyword
        return np.zeros((8, 8, 3), np.uint8)


class FakePacket:
    def __init__(self, pts: int, damaged: bool = False) -> None:
        self.pts, self.damaged = pts, damaged

    def decode(self):
        if self.damaged:
            import av.error

            raise av.error.InvalidDataError(1094995529, "Invalid data found when processing input")
        return [FakeFrame(self.pts)]


class FakeStream:
    time_base = Fraction(1, 1000)
    start_time = 0
    thread_type = "SLICE"


class FakeContainer:
    """A live connection: frames every 100 ms from ``start_wall``, then the connection closes."""

    def __init__(self, clock: FakeClock, start_wall: float, pts: list[int], damaged: frozenset[int] = frozenset()) -> None:
        self.clock, self.start_wall, self.pts, self.damaged = clock, start_wall, pts, damaged
        self.streams = type("Streams", (), {"video": [FakeStream()]})()
        self.format = type("Format", (), {"name": "rtsp"})()
        self.duration = None

    def demux(self, stream):
        for ts in self.pts:
            self.clock.now = self.start_wall + (ts - self.pts[0]) / 1000
            yield FakePacket(ts, ts in self.damaged)

    def close(self) -> None:
        pass


def fast_settings(**extra) -> SourceSettings:
    values = dict(allow_private_networks=True, connect_timeout_s=0.5, reconnect_initial_s=0.01, reconnect_max_s=0.02,
                  give_up_after_s=5.0)
    return SourceSettings(**(values | extra))


def run_puller(puller: Puller, timeout_s: float = 10.0):
    frames, statuses = [], []
    stop = threading.Event()
    thread = threading.Thread(target=puller.run, args=(lambda ts, rgb: frames.append(ts), statuses.append, stop), daemon=True)
    thread.start()
    thread.join(timeout_s)
    stop.set()
    thread.join(5)
    assert not thread.is_alive(), "the puller did not return"
    return frames, statuses


def kinds(statuses) -> list[str]:
    return [S.Kind.Name(s.kind) for s in statuses]


def test_a_live_drop_reconnects_and_reports_the_outage_as_a_gap(monkeypatch):
    clock = FakeClock()
    connections = iter([
        FakeContainer(clock, 100.0, list(range(5_000, 7_000, 100)), damaged=frozenset({5_300})),  # 2 s, one bad packet
        FakeContainer(clock, 105.0, list(range(0, 1_000, 100))),  # back 3 s after the last frame
    ])

    def fake_open(url, **kwargs):
        try:
            return next(connections)
        except StopIteration:
            import av.error

            clock.now += 0.2  # each refused attempt takes a while: the outage grows to the give-up
            raise av.error.ConnectionRefusedError(111, "Connection refused") from None

    monkeypatch.setattr(puller_module.av, "open", fake_open)
    puller = Puller(common_pb2.Source(url="rtsp://user:pw@127.0.0.1:8554/cam"), 2.0, fast_settings(give_up_after_s=0.3), clock=clock)
    frames, statuses = run_puller(puller)
    assert kinds(statuses)[:4] == ["KIND_CONNECTED", "KIND_RECONNECTING", "KIND_CONNECTED", "KIND_GAP"]
    assert kinds(statuses)[-1] == "KIND_FAILED"
    gap = statuses[3]
    assert (gap.media_ts_ms, gap.gap_ms) == (5_000, 3_100)  # the last frame was at 1900 ms
    assert frames == [0, 500, 1000, 1500, 5000, 5500]  # the damaged packet at 300 ms cost that frame only
    failed = statuses[-1]
    assert failed.code == grpc.StatusCode.UNAVAILABLE.value[0]
    assert "offline for" in failed.message and "SH_SOURCE_GIVE_UP_AFTER_S" in failed.message and "Connection refused" in failed.message
    assert all("pw" not in s.message and s.url == "rtsp://127.0.0.1:8554/cam" for s in statuses)
    assert statuses[1].attempt == 1 and "closed the connection" in statuses[1].message


def test_a_first_connect_that_never_works_fails_after_one_window(monkeypatch):
    import av.error

    calls = []

    def refuse(url, **kwargs):
        calls.append(url)
        raise av.error.ConnectionRefusedError(111, "Connection refused", url)

    monkeypatch.setattr(puller_module.av, "open", refuse)
    puller = Puller(common_pb2.Source(url="rtsp://admin:pw@127.0.0.1:1/x"), 1.0, fast_settings(connect_timeout_s=0.3))
    frames, statuses = run_puller(puller)
    assert frames == [] and kinds(statuses) == ["KIND_FAILED"]  # no RECONNECTING for a source that never connected
    assert len(calls) > 1  # retried within the window, not once and not forever
    message = statuses[0].message
    assert message.startswith("cannot open rtsp://127.0.0.1:1/x: Connection refused")
    assert "SH_SOURCE_CONNECT_TIMEOUT_S" in message and "pw" not in message
    assert statuses[0].code == grpc.StatusCode.UNAVAILABLE.value[0]


def test_the_url_is_checked_again_at_every_reconnect(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(puller_module.av, "open", lambda url, **kw: FakeContainer(clock, 100.0, list(range(0, 1000, 100))))
    answers = iter(["127.0.0.1", "169.254.169.254"])  # DNS rebinding: the second answer is the metadata endpoint

    def rebinding(url, settings):
        return check_url(url, fast_settings(allow_private_networks=False, allowed_networks="127.0.0.1/32"),
                         resolver=resolver_for(next(answers)))

    monkeypatch.setattr(puller_module, "check_url", rebinding)
    puller = Puller(common_pb2.Source(url="rtsp://cam.example.org/s"), 1.0, fast_settings(), clock=clock)
    frames, statuses = run_puller(puller)
    assert kinds(statuses) == ["KIND_CONNECTED", "KIND_RECONNECTING", "KIND_FAILED"]
    assert statuses[-1].code == grpc.StatusCode.PERMISSION_DENIED.value[0] and "metadata" in statuses[-1].message


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(source=common_pb2.Source(), decision_fps=1.0), "neither a url nor an upload"),
    (dict(source=common_pb2.Source(url="rtsp://h/s", rtsp_transport="sctp"), decision_fps=1.0), "neither 'tcp' nor 'udp'"),
    (dict(source=common_pb2.Source(url="http://h/v.mp4", speed=-1), decision_fps=1.0), "speed -1"),
    (dict(source=common_pb2.Source(url="http://h/v.mp4"), decision_fps=60.0), "decision_fps 60"),
])
def test_bad_puller_arguments_are_invalid_input(kwargs, message):
    with pytest.raises(InvalidInput, match=message):
        Puller(settings=SourceSettings(), **kwargs)


def test_decode_threads_sets_the_decoders_threads_and_changes_no_frame(monkeypatch):
    import threading

    import av as _av

    from streamharness.media import sample_path
    from streamharness.sources import Puller, SourceSettings
    from streamharness.v1 import common_pb2 as c

    opened = []
    real_open = _av.open

    def spy(*args, **kwargs):
        container = real_open(*args, **kwargs)
        opened.append(container)
        return container

    def run(threads: int) -> tuple[list[int], int]:
        opened.clear()
        ts: list[int] = []
        seen: list[int] = []

        def frame(t, rgb):
            ts.append(t)
            seen.append(opened[-1].streams.video[0].codec_context.thread_count)  # the decoder, while it runs

        monkeypatch.setattr(_av, "open", spy)
        Puller(c.Source(upload=True, speed=0), 1.0, SourceSettings(decode_threads=threads), path=sample_path("box.mp4")).run(
            frame, lambda status: None, threading.Event())
        monkeypatch.setattr(_av, "open", real_open)
        return ts, seen[0]

    default, threads_default = run(0)
    single, threads_single = run(1)
    assert single == default and len(single) >= 10
    assert threads_default > 1 and threads_single == 1  # H.264: FFmpeg's own choice is frame threads for the cores
