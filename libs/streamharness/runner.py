"""The service lifecycle: ``load → register → start → ready… → stop``, owned by one runner.

A service implements :class:`Service`. :class:`ServiceRunner` builds the gRPC server (standard
health service, reflection, error-mapping interceptor, explicit message limits, TLS when
``SH_GRPC_TLS_CERT_FILE`` is set), installs telemetry (OpenTelemetry from ``OTEL_*``, and the
Prometheus endpoint when ``SH_TELEMETRY_METRICS_PORT`` is set), loads the service, serves, keeps
the health status equal to ``service.ready()``, and on SIGTERM/SIGINT:

1. sets health to NOT_SERVING (load balancers stop sending new sessions),
2. stops accepting RPCs and lets in-flight ones finish within ``SH_SHUTDOWN_GRACE_S``,
3. calls ``service.stop(deadline)`` to stop intake, drain in-flight work and commit Kafka offsets,
4. exits 0 (1 if the drain failed or ran out of time).

The server is ``grpc.aio`` on an event loop of its own thread. ``async`` handlers (the gateway's and
ingest's sessions) are coroutines on that loop, so an open session costs memory, not a thread;
plain handlers run in a pool of ``SH_GRPC_WORKERS`` threads. Health and reflection are coroutines
on the loop too: a pool busy with slow calls never starves them.
"""

from __future__ import annotations

import abc
import asyncio
import logging
import signal
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from concurrent import futures
from typing import Any

import grpc
import grpc.aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from streamharness.errors import SettingsError
from streamharness.grpcutil.interceptors import ErrorMappingInterceptor, message_size_options
from streamharness.settings import ServiceSettings, TelemetrySettings, load_settings
from streamharness.telemetry import setup_logging, setup_telemetry, shutdown_telemetry

log = logging.getLogger("streamharness.runner")


class Service(abc.ABC):
    """What a StreamHarness service provides to the runner."""

    #: Full names of the gRPC services this service registers (for health and reflection).
    grpc_service_names: Sequence[str] = ()

    def load(self) -> None:
        """Load models and open clients. Runs before the server accepts calls; raise to fail start."""

    def register(self, server: grpc.aio.Server) -> None:
        """Add the service's servicers to ``server`` (a ``grpc.aio`` server: ``async`` methods run on
        its loop, plain ones in its thread pool)."""

    def start(self) -> None:
        """Start background work (Kafka consumers...). Must return promptly."""

    @abc.abstractmethod
    def ready(self) -> bool:
        """True when the models are loaded and the dependencies answer right now."""

    def stop(self, deadline: float) -> None:
        """Stop intake, finish in-flight work, commit offsets; return before ``deadline`` (monotonic)."""


class ServiceRunner:
    def __init__(self, service: Service, settings: ServiceSettings, telemetry: TelemetrySettings | None = None):
        self.service = service
        self.settings = settings
        self.telemetry = telemetry or TelemetrySettings()
        self.port: int | None = None
        self._stop = threading.Event()
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._health_server: grpc.aio.Server | None = None
        self.health_port: int | None = None

    # -- lifecycle -----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if not self._stop.is_set():
            log.info("stop requested: draining (grace %.1fs)", self.settings.shutdown_grace_s)
        self._stop.set()

    def _on_loop(self, coro: Coroutine[Any, Any, Any], timeout: float | None = 30.0) -> Any:
        """Run ``coro`` on the server's event loop from another thread; its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def _set_health(self, status: int) -> None:
        async def put() -> None:
            for name in ("", *self.service.grpc_service_names):
                await self._health.set(name, status)

        if self._loop is None or self._loop.is_closed():
            return  # stopped meanwhile
        self._on_loop(put())

    def _credentials(self) -> grpc.ServerCredentials | None:
        s = self.settings
        if s.grpc_tls_cert_file is None:
            return None
        ca = s.grpc_tls_client_ca_file.read_bytes() if s.grpc_tls_client_ca_file else None
        return grpc.ssl_server_credentials([(s.grpc_tls_key_file.read_bytes(), s.grpc_tls_cert_file.read_bytes())],
                                           root_certificates=ca, require_client_auth=ca is not None)

    async def _start_server(self) -> grpc.aio.Server:
        server = grpc.aio.server(
            migration_thread_pool=futures.ThreadPoolExecutor(max_workers=self.settings.grpc_workers, thread_name_prefix="grpc"),
            interceptors=[ErrorMappingInterceptor()],
            options=message_size_options(self.settings.grpc_max_message_bytes),
        )
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (*self.service.grpc_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        address = f"{self.settings.grpc_host}:{self.settings.grpc_port}"
        credentials = self._credentials()
        try:
            port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
        except RuntimeError:
            port = 0
        if port == 0:
            raise SettingsError(f"SH_GRPC_PORT: cannot bind {self.settings.grpc_host}:{self.settings.grpc_port}")
        self.port = port
        for name in ("", *self.service.grpc_service_names):
            await self._health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.start()
        if self.settings.grpc_health_port is not None:
            # Health alone, in plaintext: the kubelet's probe speaks no TLS. The same servicer, so
            # both ports say the same.
            self._health_server = grpc.aio.server()
            health_pb2_grpc.add_HealthServicer_to_server(self._health, self._health_server)
            self.health_port = self._health_server.add_insecure_port(f"{self.settings.grpc_host}:{self.settings.grpc_health_port}")
            if self.health_port == 0:
                raise SettingsError(f"SH_GRPC_HEALTH_PORT: cannot bind {self.settings.grpc_host}:{self.settings.grpc_health_port}")
            await self._health_server.start()
        return server

    def serve(self) -> grpc.aio.Server:
        """Load, build and start the gRPC server; return it (the caller then waits)."""
        self.service.load()
        self._loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(target=self._loop.run_forever, name="grpc-loop", daemon=True)
        self._loop_thread.start()
        self._server = self._on_loop(self._start_server())
        self.service.start()
        log.info("%s listening on %s:%d%s", self.settings.service_name, self.settings.grpc_host, self.port,
                 " (TLS)" if self.settings.grpc_tls_cert_file else "")
        return self._server

    def _watch_readiness(self) -> None:
        last: bool | None = None
        while not self._stop.is_set():
            try:
                ok = bool(self.service.ready())
            except Exception:  # noqa: BLE001 - a failing probe means not ready
                log.exception("readiness probe failed")
                ok = False
            if ok != last:
                log.info("readiness: %s", "SERVING" if ok else "NOT_SERVING")
                self._set_health(health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING)
                last = ok
            self._stop.wait(self.settings.readiness_interval_s)

    def shutdown(self) -> bool:
        """Drain and stop. True when everything finished within the grace period."""
        deadline = time.monotonic() + self.settings.shutdown_grace_s
        stopped: futures.Future[None] | None = None
        if self._server is not None and self._loop is not None:
            self._on_loop(self._health.enter_graceful_shutdown())
            # Calls first (half the grace; then what is still open is cancelled): what their ends
            # publish (a gateway's sessions going away, ingest's last frames) still has a producer.
            stopped = asyncio.run_coroutine_threadsafe(self._server.stop(self.settings.shutdown_grace_s / 2), self._loop)
            if self._health_server is not None:
                asyncio.run_coroutine_threadsafe(self._health_server.stop(None), self._loop)
            try:
                stopped.result(self.settings.shutdown_grace_s / 2 + 1.0)
            except futures.TimeoutError:
                pass  # waited for below
        clean = True
        try:
            self.service.stop(deadline)
        except Exception:  # noqa: BLE001
            log.exception("drain failed")
            clean = False
        if stopped is not None:
            try:
                stopped.result(max(0.0, deadline - time.monotonic()) + 1.0)
            except futures.TimeoutError:
                log.error("gRPC server did not stop within the grace period")
                clean = False
        if self._loop is not None and self._loop_thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._loop_thread.join(5.0)
            if not self._loop_thread.is_alive():
                self._loop.close()
            self._loop = None
        log.info("%s stopped%s", self.settings.service_name, "" if clean else " (unclean)")
        return clean

    def run(self, install_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop), then drain. Returns the exit code."""
        setup_logging(self.telemetry.log_level, self.telemetry.log_json)
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
            # Before load: a busy metrics port fails the start, and what loading records is served.
            setup_telemetry(self.settings.service_name, self.telemetry.metrics_port, self.telemetry.metrics_host)
            self.serve()
        except Exception:
            log.exception("%s failed to start", self.settings.service_name)
            self.request_stop()
            self.shutdown()
            shutdown_telemetry()
            return 1
        watcher = threading.Thread(target=self._watch_readiness, name="readiness", daemon=True)
        watcher.start()
        while not self._stop.wait(0.5):
            pass
        clean = self.shutdown()
        shutdown_telemetry()
        return 0 if clean else 1


def run_service(service: Service, settings: ServiceSettings | None = None) -> int:
    """Entry-point helper: settings from the environment, fail fast with the variable's name."""
    try:
        settings = settings or load_settings(ServiceSettings)
        telemetry = load_settings(TelemetrySettings)
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    return ServiceRunner(service, settings, telemetry).run()


def serve_main(factory: Callable[[], Service]) -> int:
    """A service's ``main``: build it (its own settings load here; a bad one exits 2 naming the
    variable), then run it until SIGTERM."""
    try:
        service = factory()
    except SettingsError as err:
        print(f"error: {err}", flush=True)
        return 2
    return run_service(service)
