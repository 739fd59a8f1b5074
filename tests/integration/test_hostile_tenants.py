"""Many tenants, hostile input (issue 13): the running gateway and ingest (real Kafka broker, API
keys in a hashed keys file, JWTs from an RSA issuer, internal identity tokens), tried as a hostile
tenant would. Every case asserts the status and its message and that other sessions went on.

The servers run with 2 gRPC worker threads each: sessions are coroutines and hold none."""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import struct
import threading
import time
import uuid
from pathlib import Path

import cv2
import grpc
import grpc.aio
import jwt
import numpy as np
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from streamharness import topics
from streamharness.auth import AuthSettings, InternalTokens, add_api_key, hash_key, new_api_key, remove_api_key
from streamharness.gateway.service import GatewaySettings, GatewayStage
from streamharness.hosts.kafka import KafkaHost
from streamharness.ingest.service import IngestSettings, IngestStage
from streamharness.kafka import ensure_topics
from streamharness.runner import ServiceRunner
from streamharness.settings import KafkaSettings, ServiceSettings, load_settings
from streamharness.topology import TOPOLOGY
from streamharness.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, session_pb2

pytestmark = pytest.mark.integration
CM = session_pb2.ClientMessage
STREAM_METHOD = "/streamharness.v1.SessionService/Stream"
TENANTS = ("alpha", "beta", "flood", "mallory", "rot", "shed", "canary", "bomb", "jump", "utf", "big", "rate", "bye")
ISSUER = "https://idp.example.test/"


def jpeg(width: int = 64, height: int = 48, value: int = 90) -> bytes:
    return cv2.imencode(".jpg", np.full((height, width, 3), value, np.uint8))[1].tobytes()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A 16x16 JPEG whose SOF0 header says ``width`` x ``height`` (a decompression bomb's header)."""
    data = bytearray(jpeg(16, 16))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


class Env:
    def __init__(self, tmp: Path, kafka: KafkaSettings) -> None:
        self.tmp, self.kafka = tmp, kafka
        self.keys_file = tmp / "api-keys.json"
        self.keys = {t: new_api_key() for t in TENANTS}
        for tenant, key in self.keys.items():
            add_api_key(self.keys_file, tenant, key)
        self.rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        (tmp / "idp.pem").write_bytes(self.rsa.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
        self.issuers_file = tmp / "issuers.json"
        self.issuers_file.write_text(json.dumps([{"issuer": ISSUER, "audience": "streamharness", "algorithms": ["RS256"],
                                                  "public_key_file": "idp.pem", "tenant_claim": "org"}]))
        self.runners: list[ServiceRunner] = []
        self.tokens = InternalTokens(AuthSettings(), "test")

    def serve(self, service, name: str, **service_settings) -> ServiceRunner:
        runner = ServiceRunner(service, ServiceSettings(service_name=name, grpc_port=0, grpc_workers=2, shutdown_grace_s=3,
                                                        readiness_interval_s=0.2, **service_settings))
        runner.serve()
        threading.Thread(target=runner._watch_readiness, daemon=True, name=f"{name}-readiness").start()  # as run() does
        self.runners.append(runner)
        return runner

    def gateway(self, name: str, service_settings: dict | None = None, **overrides) -> str:
        settings = GatewaySettings(replica_id=name, ingest_address=self.ingest_address, api_keys_file=self.keys_file, end_wait_for_decision=False,
                                   jwt_issuers_file=self.issuers_file, auth_reload_s=0.2, end_grace_s=5, **overrides)
        service = KafkaHost(GatewayStage(settings), TOPOLOGY["gateway"], self.kafka)
        runner = self.serve(service, name, **(service_settings or {}))
        self.last_runner = runner
        deadline = time.monotonic() + 30
        while not service.ready():
            assert time.monotonic() < deadline, "gateway never became ready"
            time.sleep(0.1)
        return f"127.0.0.1:{runner.port}"

    def bearer(self, tenant: str, **claims) -> str:
        now = int(time.time())
        body = {"iss": ISSUER, "aud": "streamharness", "org": tenant, "iat": now, "exp": now + 300, **claims}
        return "Bearer " + jwt.encode(body, self.rsa, algorithm="RS256")


@pytest.fixture(scope="module")
def env(kafka_broker, tmp_path_factory):
    kafka = load_settings(KafkaSettings, bootstrap_servers=kafka_broker.bootstrap_servers, security_protocol="PLAINTEXT",
                          topic_prefix=f"t{uuid.uuid4().hex[:12]}.", partitions=3, consumer_poll_timeout_ms=100)
    ensure_topics(kafka, topics.PIPELINE)
    e = Env(tmp_path_factory.mktemp("hostile"), kafka)
    ingest = e.serve(KafkaHost(IngestStage(IngestSettings(max_pixels=320 * 240, tenant_max_frames_per_s=4, tenant_frames_burst=4)),
                               TOPOLOGY["ingest"], kafka), "ingest")
    e.ingest_address = f"127.0.0.1:{ingest.port}"
    e.address = e.gateway("gw-main", max_sessions_per_tenant=400, questions_per_s=1.0, questions_burst=3,
                          tenant_questions_per_s=50, tenant_questions_burst=50, first_message_timeout_s=1.5)
    yield e
    for runner in reversed(e.runners):
        runner.request_stop()
        runner.shutdown()


class Raw:
    """A session that sends raw bytes (what a hostile client can put on the wire)."""

    def __init__(self, address: str, metadata: tuple[tuple[str, str], ...]) -> None:
        self.channel = grpc.aio.insecure_channel(address, options=[("grpc.max_send_message_length", 64 * 1024 * 1024)])
        self._out: asyncio.Queue = asyncio.Queue()
        method = self.channel.stream_stream(STREAM_METHOD, request_serializer=lambda b: b,
                                            response_deserializer=session_pb2.ServerMessage.FromString)
        self.call = method(self._requests(), metadata=metadata)

    async def _requests(self):
        while True:
            item = await self._out.get()
            if item is None:
                return
            yield item if isinstance(item, bytes) else item.SerializeToString()

    async def send(self, message) -> None:
        await self._out.put(message)

    async def start(self, stream_id: str) -> session_pb2.ServerMessage:
        await self.send(CM(start=session_pb2.SessionStart(stream_id=stream_id)))
        return await self.read()

    async def read(self, timeout: float = 15.0) -> session_pb2.ServerMessage:
        msg = await asyncio.wait_for(self.call.read(), timeout)
        assert msg is not grpc.aio.EOF, "the call ended"
        return msg

    async def read_kind(self, kind: str, timeout: float = 15.0) -> session_pb2.ServerMessage:
        while True:
            msg = await self.read(timeout)
            if msg.WhichOneof("message") == kind:
                return msg

    async def status(self, timeout: float = 15.0) -> tuple[grpc.StatusCode, str]:
        """Read until the call ends; its status."""
        try:
            while await asyncio.wait_for(self.call.read(), timeout) is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as err:
            return err.code(), err.details()
        return await self.call.code(), await self.call.details()

    async def close(self) -> None:
        self.call.cancel()
        await self.channel.close()


def key_md(env: Env, tenant: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", env.keys[tenant]),)


def frame(seq: int, ts: int, image: bytes | None = None) -> CM:
    return CM(frame=session_pb2.Frame(seq=seq, media_ts_ms=ts, image=image or jpeg(), encoding=common_pb2.IMAGE_ENCODING_JPEG))


async def frame_answer(s: Raw, seq: int) -> session_pb2.ServerMessage:
    """The ack or error of frame ``seq``."""
    while True:
        msg = await s.read()
        kind = msg.WhichOneof("message")
        if (kind == "ack" and msg.ack.kind == session_pb2.Ack.KIND_FRAME and msg.ack.seq == seq) or (kind == "error" and msg.error.seq == seq):
            return msg


async def healthy_within(address: str, seconds: float) -> float:
    """Seconds the slowest health call took until one said SERVING (readiness is polled every 0.2 s)."""
    async with grpc.aio.insecure_channel(address) as ch:
        slowest, deadline = 0.0, time.monotonic() + 5
        while True:
            t0 = time.monotonic()
            reply = await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=seconds)
            slowest = max(slowest, time.monotonic() - t0)
            if reply.status == health_pb2.HealthCheckResponse.SERVING:
                return slowest
            assert time.monotonic() < deadline, "never SERVING"
            await asyncio.sleep(0.1)


def reflected_services(address: str) -> list[str]:
    with grpc.insecure_channel(address) as channel:
        return list(ProtoReflectionDescriptorDatabase(channel).get_services())


# -- sessions are not threads ------------------------------------------------------------------------


def test_hundreds_of_idle_sessions_starve_neither_health_nor_another_tenant(env):
    async def run():
        idle = [Raw(env.address, key_md(env, "flood")) for _ in range(300)]
        accepted = await asyncio.gather(*(s.start(f"idle-{i}") for i, s in enumerate(idle)))
        assert all(m.WhichOneof("message") == "accepted" for m in accepted)
        # 300 open sessions on 2 worker threads: health, ingest's health and another tenant answer at once.
        assert await healthy_within(env.address, 2.0) < 2.0
        assert await healthy_within(env.ingest_address, 2.0) < 2.0
        t0 = time.monotonic()  # reflection too
        services = await asyncio.to_thread(reflected_services, env.address)
        assert "streamharness.v1.SessionService" in services and time.monotonic() - t0 < 2.0
        other = Raw(env.address, key_md(env, "alpha"))
        t0 = time.monotonic()
        assert (await other.start("alpha-cam")).accepted.key.tenant == "alpha"
        await other.send(frame(1, 0))
        ack = await frame_answer(other, 1)
        assert ack.ack.sampled and time.monotonic() - t0 < 5.0
        # The tenant's quota is reached before anything is allocated for the 401st call.
        extra = [Raw(env.address, key_md(env, "flood")) for _ in range(100)]
        results = await asyncio.gather(*(s.start(f"more-{i}") for i, s in enumerate(extra)))
        assert all(m.WhichOneof("message") == "accepted" for m in results)
        extra.append(Raw(env.address, key_md(env, "flood")))
        code, details = await extra[100].status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "400 open sessions (limit 400" in details
        for s in [*idle, *extra, other]:
            await s.close()

    asyncio.run(run())


def test_a_call_that_never_sends_its_first_message_is_ended(env):
    async def run():
        silent = Raw(env.address, key_md(env, "alpha"))
        t0 = time.monotonic()
        code, details = await silent.status()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no SessionStart within 1.5 s" in details
        assert time.monotonic() - t0 < 6
        await silent.close()

    asyncio.run(run())


def test_an_idle_session_is_ended_and_its_quota_given_back(env):
    address = env.gateway("gw-idle", idle_timeout_s=1.0, max_sessions_per_tenant=1)

    async def run():
        s = Raw(address, key_md(env, "bye"))
        assert (await s.start("idle")).WhichOneof("message") == "accepted"
        code, details = await s.status()
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and "no message for 1 s (SH_GATEWAY_IDLE_TIMEOUT_S)" in details
        await s.close()
        again = Raw(address, key_md(env, "bye"))  # the one session of the quota is free again
        assert (await again.start("idle")).WhichOneof("message") == "accepted"
        await again.close()

    asyncio.run(run())


# -- identity on every hop -------------------------------------------------------------------------


def self_signed(tmp: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gateway.test")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .sign(key, hashes.SHA256()))
    (tmp / "tls.crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp / "tls.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                    serialization.NoEncryption()))
    return tmp / "tls.crt", tmp / "tls.key"


def test_the_public_port_speaks_tls_and_health_stays_plaintext_on_its_own_port(env):
    from streamharness.client import Session

    cert, key = self_signed(env.tmp)
    address = env.gateway("gw-tls", service_settings={"grpc_tls_cert_file": cert, "grpc_tls_key_file": key, "grpc_health_port": 0})
    health_port = env.last_runner.health_port

    async def run():
        async with Session(address, stream_id="tls-cam", api_key=env.keys["beta"], root_certificates=cert.read_bytes()) as s:
            assert s.session_id
        plain = Raw(address, key_md(env, "beta"))  # no TLS: no session
        await plain.send(CM(start=session_pb2.SessionStart(stream_id="x")))
        code, _ = await plain.status()
        assert code == grpc.StatusCode.UNAVAILABLE
        await plain.close()
        assert await healthy_within(f"127.0.0.1:{health_port}", 2.0) < 2.0
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as ch:  # health only on that port
            # A unary call (message and status in one batch: a streaming call's write can lose the
            # race with an early status and read INTERNAL on the client).
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await ch.unary_unary(STREAM_METHOD)(b"", timeout=5)
            assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED

    asyncio.run(run())


def test_callers_without_valid_credentials_are_refused_and_audited(env, caplog):
    caplog.set_level(logging.WARNING, logger="streamharness.audit")

    async def status(metadata):
        s = Raw(env.address, metadata)
        await s.send(CM(start=session_pb2.SessionStart(stream_id="x")))
        result = await s.status()
        await s.close()
        return result

    async def run():
        cases = [((), "no credentials"), ((("x-api-key", "sh_not-a-key"),), "unknown API key"),
                 ((("x-tenant", "alpha"),), "no credentials"),  # a tenant name is no credential
                 ((("authorization", env.bearer("alpha", exp=int(time.time()) - 3600)),), "Signature has expired"),
                 ((("authorization", env.bearer("alpha", aud="another-service")),), "Audience doesn't match"),
                 ((("authorization", "Bearer " + jwt.encode({"iss": ISSUER, "org": "alpha", "aud": "streamharness", "exp": int(time.time()) + 60},
                                                             "guessed-shared-secret-of-32-chars!!", algorithm="HS256")),), "JWT refused")]
        for metadata, words in cases:
            code, details = await status(metadata)
            assert code == grpc.StatusCode.UNAUTHENTICATED and words in details, (metadata, details)

    asyncio.run(run())
    records = [json.loads(r.getMessage()) for r in caplog.records if r.name == "streamharness.audit"]
    assert sum(r["audit"] == "auth_failed" for r in records) >= 6
    assert not any("sh_not-a-key" in r.getMessage() for r in caplog.records), "a key reached the log"
    assert any(r.get("key_id") for r in records)  # named by its hash's prefix instead


def test_a_jwt_from_the_configured_issuer_names_the_tenant(env):
    async def run():
        s = Raw(env.address, (("authorization", env.bearer("beta")),))
        accepted = await s.start("jwt-cam")
        assert accepted.accepted.key.tenant == "beta"
        await s.close()

    asyncio.run(run())


def test_api_keys_rotate_without_a_restart(env):
    new_key = new_api_key()

    async def accepted(key: str) -> bool:
        s = Raw(env.address, (("x-api-key", key),))
        await s.send(CM(start=session_pb2.SessionStart(stream_id="rot")))
        try:
            msg = await s.read()
            return msg.WhichOneof("message") == "accepted"
        except grpc.aio.AioRpcError as err:
            assert err.code() == grpc.StatusCode.UNAUTHENTICATED
            return False
        finally:
            await s.close()

    async def eventually(key: str, want: bool) -> None:
        deadline = time.monotonic() + 10
        while await accepted(key) != want:
            assert time.monotonic() < deadline, f"key still {'refused' if want else 'accepted'} after 10 s"
            await asyncio.sleep(0.2)

    async def run():
        old = env.keys["rot"]
        assert await accepted(old) and not await accepted(new_key)
        add_api_key(env.keys_file, "rot", new_key)  # step 1: both keys valid
        await eventually(new_key, True)
        assert await accepted(old)
        assert remove_api_key(env.keys_file, "rot", hash_key(old)) == 1
        await eventually(old, False)  # step 2: the old key is gone, the new one stays
        assert await accepted(new_key)
        env.keys_file.write_text("{ not json")  # a broken file keeps the keys read before it
        await asyncio.sleep(0.5)
        assert await accepted(new_key)
        env.keys["rot"] = new_key
        env.keys_file.unlink()
        for tenant, key in env.keys.items():  # whole again for the tests after this one
            add_api_key(env.keys_file, tenant, key)

    asyncio.run(run())


def test_ingest_refuses_calls_without_identity_or_for_another_tenants_stream(env):
    def request(tenant: str) -> ingest_pb2.IngestFrameRequest:
        return ingest_pb2.IngestFrameRequest(key=common_pb2.StreamKey(tenant=tenant, stream_id="cam"), session_id="s",
                                             media_ts_ms=0, image=jpeg(), encoding=common_pb2.IMAGE_ENCODING_JPEG, seq=1)

    with grpc.insecure_channel(env.ingest_address) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        forged = InternalTokens(AuthSettings(internal_secret="not-the-platform-secret-but-32-chars"), "gateway")
        for metadata, code, words in (
            ((), grpc.StatusCode.UNAUTHENTICATED, "no x-sh-identity metadata"),
            (forged.metadata("beta", "ingest"), grpc.StatusCode.UNAUTHENTICATED, "Signature verification failed"),
            (env.tokens.metadata("beta", "memory"), grpc.StatusCode.UNAUTHENTICATED, "Audience doesn't match"),
            (env.tokens.metadata("alpha", "ingest"), grpc.StatusCode.NOT_FOUND, "ingest has no stream 'cam'"),  # alpha writing into beta's stream
        ):
            with pytest.raises(grpc.RpcError) as err:
                list(stub.IngestFrames(iter([request("beta")]), metadata=metadata, timeout=10))
            assert err.value.code() == code and words in err.value.details(), err.value.details()
        ok = list(stub.IngestFrames(iter([request("beta")]), metadata=env.tokens.metadata("beta", "ingest"), timeout=10))
        assert [r.status for r in ok] == [ingest_pb2.IngestFrameResult.STATUS_PUBLISHED]


# -- input refused before it costs anything ----------------------------------------------------------


def test_a_decompression_bomb_is_refused_from_its_header_and_the_stream_goes_on(env):
    async def run():
        s = Raw(env.address, key_md(env, "bomb"))
        await s.start("bomb-cam")
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        for seq, (w, h) in enumerate(((13000, 13000), (20000, 20000)), start=1):
            await s.send(frame(seq, seq * 1000, jpeg_claiming(w, h)))
            err = (await frame_answer(s, seq)).error
            assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and not err.fatal
            assert f"header says {w}x{h} = {w * h} pixels, above the limit of 8294400 (SH_INGEST_MAX_INPUT_PIXELS)" in err.message
        grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB for two bombs (a decoded 13000x13000 frame is 507 MB)"
        await s.send(frame(3, 3000))
        assert (await frame_answer(s, 3)).ack.sampled
        await s.close()

    asyncio.run(run())


def test_a_far_future_frame_is_refused_and_the_stream_goes_on(env):
    async def run():
        s = Raw(env.address, key_md(env, "jump"))
        await s.start("jump-cam")
        ten_years = 10 * 365 * 24 * 3600 * 1000
        for seq, ts in ((1, 1000), (2, ten_years)):
            await s.send(frame(seq, ts))
        assert (await frame_answer(s, 1)).ack.sampled
        err = (await frame_answer(s, 2)).error
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "more than the 600000 ms a stream may jump" in err.message
        await s.send(frame(3, 2000))  # the stream goes on from where it was
        assert (await frame_answer(s, 3)).ack.sampled
        await s.close()

    asyncio.run(run())


def test_invalid_utf8_and_garbage_are_answered_and_the_session_goes_on(env):
    good = CM(question=session_pb2.Question(question_id="q1", text="PLACEHOLDER", media_ts_ms=0)).SerializeToString()
    bad_utf8 = good.replace(b"PLACEHOLDER", b"caf\xe9 \xff\xfe!!")  # same length: the framing stays valid

    async def run():
        s = Raw(env.address, key_md(env, "utf"))
        await s.start("utf-cam")
        await s.send(bad_utf8)
        err = (await s.read_kind("error")).error
        assert err.code == grpc.StatusCode.INVALID_ARGUMENT.value[0] and "field question.text is not valid UTF-8" in err.message
        await s.send(b"\xff\xff\xff\xff garbage")
        err = (await s.read_kind("error")).error
        assert "is not a valid ClientMessage" in err.message and not err.fatal
        await s.send(CM(question=session_pb2.Question(question_id="q2", text="still there?", media_ts_ms=0)))
        assert (await s.read_kind("ack")).ack.kind == session_pb2.Ack.KIND_QUESTION
        await s.close()

    asyncio.run(run())


def test_oversize_fields_get_resource_exhausted_naming_the_limit(env):
    async def run():
        s = Raw(env.address, key_md(env, "big"))
        await s.start("big-cam")
        await s.send(CM(question=session_pb2.Question(question_id="q", text="x" * 2001)))
        err = (await s.read_kind("error")).error
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert "question.text has 2001 characters, above the limit of 2000 (SH_GATEWAY_MAX_TEXT_CHARS)" in err.message
        await s.send(frame(1, 0, b"\xff\xd8" + b"\0" * (9 * 1024 * 1024)))  # above the 8 MiB frame limit, below the transport's
        err = (await frame_answer(s, 1)).error
        assert err.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and "above the limit of 8388608 (SH_GATEWAY_MAX_FRAME_BYTES)" in err.message
        await s.send(frame(2, 1000))
        assert (await frame_answer(s, 2)).ack.sampled  # the session goes on
        # Beyond the transport's limit gRPC itself ends the call (the protocol allows no answer to it).
        await s.send(frame(3, 2000, b"\xff\xd8" + b"\0" * (40 * 1024 * 1024)))
        code, details = await s.status()
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "16777216" in details
        await s.close()

    asyncio.run(run())


def test_questions_are_rate_limited_with_when_it_resets(env):
    async def run():
        s = Raw(env.address, key_md(env, "rate"))
        await s.start("rate-cam")
        for i in range(8):
            await s.send(CM(question=session_pb2.Question(question_id=f"q{i}", text="how many?", media_ts_ms=0)))
        acks, errors = 0, []
        while acks + len(errors) < 8:
            msg = await s.read()
            if msg.WhichOneof("message") == "ack":
                acks += 1
            elif msg.WhichOneof("message") == "error":
                errors.append(msg.error)
        assert acks == 3  # the burst
        assert all(e.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0] and not e.fatal for e in errors)
        assert all("limited to 1/s per session (burst 3, SH_GATEWAY_QUESTIONS_PER_S); resets in" in e.message for e in errors)
        assert all(0 < e.retry_after_ms <= 1000 for e in errors)
        await asyncio.sleep(max(e.retry_after_ms for e in errors) / 1000 + 0.1)
        await s.send(CM(question=session_pb2.Question(question_id="later", text="how many?", media_ts_ms=0)))
        assert (await s.read_kind("ack")).ack.kind == session_pb2.Ack.KIND_QUESTION
        await s.close()

    asyncio.run(run())


def test_a_tenant_over_its_frame_quota_has_its_own_frames_shed(env):
    async def run():
        flood = Raw(env.address, key_md(env, "shed"))
        canary = Raw(env.address, key_md(env, "canary"))
        await flood.start("shed-cam")
        await canary.start("canary-cam")
        for seq in range(1, 21):
            await flood.send(frame(seq, seq * 1000))
        shed = [(await frame_answer(flood, seq)).ack.shed for seq in range(1, 21)]
        assert 10 <= sum(shed) <= 16, shed  # 4 a second with a burst of 4: most of 20 at once are shed
        for seq in range(1, 4):
            await canary.send(frame(seq, seq * 1000))
            ack = (await frame_answer(canary, seq)).ack
            assert ack.sampled and not ack.shed
        await flood.close()
        await canary.close()

    asyncio.run(run())


def test_a_client_cancel_is_logged_at_info_without_a_traceback(env, caplog):
    caplog.set_level(logging.INFO)

    async def run():
        s = Raw(env.address, key_md(env, "alpha"))
        await s.start("cancel-cam")
        await s.close()
        await asyncio.sleep(0.5)

    asyncio.run(run())
    cancels = [r for r in caplog.records if "cancelled the call" in r.getMessage()]
    assert cancels and all(r.levelno == logging.INFO and r.exc_info is None for r in cancels)
    # The services' own logs. (grpc.aio's client side may log "Event loop is closed" on the asyncio
    # logger when this process's many short test loops end: a test artefact, not the gateway's.)
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name.startswith("streamharness")]
    assert not errors, [r.getMessage() for r in errors]


# -- a bounded fuzz of the live session --------------------------------------------------------------

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

_VALID = [frame(1, 0).SerializeToString(), CM(question=session_pb2.Question(question_id="q", text="hi?")).SerializeToString(),
          CM(instruction=session_pb2.InstructionUpdate(add=common_pb2.StandingInstruction(instruction_id="i", text="a dog"))).SerializeToString()]


def _mutated(data: st.DataObject) -> bytes:
    raw = bytearray(data.draw(st.sampled_from(_VALID)))
    for _ in range(data.draw(st.integers(0, 4))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    return bytes(raw)


def _ends(raw: bytes) -> bool:
    try:
        return CM.FromString(raw).WhichOneof("message") == "end"
    except Exception:  # noqa: BLE001 - unparseable: not an end
        return False


@settings(max_examples=4, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_every_message_gets_one_answer_and_the_session_survives(env, data):
    drawn = [data.draw(st.binary(max_size=64)) if data.draw(st.booleans()) else _mutated(data) for _ in range(data.draw(st.integers(10, 25)))]
    messages = [m for m in drawn if not _ends(m)]

    async def run():
        s = Raw(env.address, key_md(env, "mallory"))
        await s.start(f"fuzz-{uuid.uuid4().hex[:6]}")
        for m in messages:
            await s.send(m)
        replies = 0
        while replies < len(messages):
            kind = (await s.read()).WhichOneof("message")
            assert kind in ("ack", "error"), kind
            replies += 1
        await asyncio.sleep(1.1)  # a question token again
        await s.send(CM(question=session_pb2.Question(question_id="alive", text="still there?")))
        while (msg := await s.read()).WhichOneof("message") != "ack" or msg.ack.kind != session_pb2.Ack.KIND_QUESTION:
            assert not (msg.WhichOneof("message") == "error" and msg.error.fatal), msg
        await s.close()

    asyncio.run(run())
