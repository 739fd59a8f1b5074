"""The service lifecycle: ``load → register → start → ready… → stop``, owned by one runner.

A service implements :class:`Service`. :class:`ServiceRunner` builds the gRPC server (standard
health service, reflection, error-mapping interceptor, explicit message limits), loads the
service, serves, keeps the health status equal to ``service.ready()``, and on SIGTERM/SIGINT:

1. sets health to NOT_SERVING (load balancers stop sending new sessions),
2. stops accepting RPCs and lets in-flight ones finish within ``SH_SHUTDOWN_GRACE_S``,
3. calls ``service.stop(deadline)`` to stop intake, drain in-flight work and commit Kafka offsets,
4. exits 0 (1 if the drain failed or ran out of time).
"""

from __future__ import annotations

import abc
import logging
import signal
import threading
import time
from collections.abc import Callable, Sequence
from concurrent import futures

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
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

    def register(self, server: grpc.Server) -> None:
        """Add the service's servicers to ``server``."""

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
        self._server: grpc.Server | None = None
        self._health = health.HealthServicer(experimental_non_blocking=True)

    # -- lifecycle -----------------------------------------------------------------------------
    def request_stop(self, *_: object) -> None:
        if not self._stop.is_set():
            log.info("stop requested: draining (grace %.1fs)", self.settings.shutdown_grace_s)
        self._stop.set()

    def _set_health(self, status: int) -> None:
        for name in ("", *self.service.grpc_service_names):
            self._health.set(name, status)

    def serve(self) -> grpc.Server:
        """Load, build and start the gRPC server; return it (the caller then waits)."""
        self.service.load()
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=self.settings.grpc_workers, thread_name_prefix="grpc"),
            interceptors=[ErrorMappingInterceptor()],
            options=message_size_options(self.settings.grpc_max_message_bytes),
        )
        self.service.register(server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        names = (*self.service.grpc_service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME)
        reflection.enable_server_reflection(names, server)
        self.port = server.add_insecure_port(f"{self.settings.grpc_host}:{self.settings.grpc_port}")
        if self.port == 0:
            raise SettingsError(f"SH_GRPC_PORT: cannot bind {self.settings.grpc_host}:{self.settings.grpc_port}")
        self._set_health(health_pb2.HealthCheckResponse.NOT_SERVING)
        server.start()
        self._server = server
        self.service.start()
        log.info("%s listening on %s:%d", self.settings.service_name, self.settings.grpc_host, self.port)
        return server

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
        self._health.enter_graceful_shutdown()
        stopped = self._server.stop(self.settings.shutdown_grace_s) if self._server else threading.Event()
        clean = True
        try:
            self.service.stop(deadline)
        except Exception:  # noqa: BLE001
            log.exception("drain failed")
            clean = False
        if self._server and not stopped.wait(max(0.0, deadline - time.monotonic()) + 1.0):
            log.error("gRPC server did not stop within the grace period")
            clean = False
        log.info("%s stopped%s", self.settings.service_name, "" if clean else " (unclean)")
        return clean

    def run(self, install_signals: bool = True) -> int:
        """Serve until SIGTERM/SIGINT (or request_stop), then drain. Returns the exit code."""
        setup_logging(self.telemetry.log_level, self.telemetry.log_json)
        setup_telemetry(self.settings.service_name)
        if install_signals:
            signal.signal(signal.SIGTERM, self.request_stop)
            signal.signal(signal.SIGINT, self.request_stop)
        try:
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
