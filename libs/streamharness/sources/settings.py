"""Settings of pulled sources: which URLs may be pulled, how long to wait, how many at once."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3
KNOWN_SCHEMES = frozenset({"rtsp", "rtsps", "rtmp", "rtmps", "http", "https"})


class SourceSettings(BaseSettings):
    """Pulled sources (a session opened with a source URL or an upload): the URL policy, the
    timeouts and reconnect backoff of a puller, and the per-replica limits."""

    model_config = SettingsConfigDict(env_prefix="SH_SOURCE_", frozen=True, extra="forbid")

    allowed_schemes: str = Field(
        "rtsp,rtsps,rtmp,rtmps,http,https",
        description="Comma-separated URL schemes a source may use (a subset of rtsp, rtsps, rtmp, rtmps, http, https); "
        "file:// and every other scheme are always refused.",
    )
    allow_private_networks: bool = Field(
        False,
        description="Allow sources on loopback, private (RFC 1918), link-local (including the 169.254.169.254 metadata "
        "endpoint), carrier-grade NAT, unique-local, multicast, reserved or unspecified addresses. Off: such a URL is refused "
        "(PERMISSION_DENIED) unless its address is in SH_SOURCE_ALLOWED_NETWORKS.",
    )
    allowed_networks: str = Field(
        "",
        description="Comma-separated CIDRs allowed even when private, e.g. the cameras' VLAN '10.20.0.0/16'.",
    )
    denied_networks: str = Field(
        "",
        description="Comma-separated CIDRs always refused, even when public or in SH_SOURCE_ALLOWED_NETWORKS.",
    )
    connect_timeout_s: float = Field(
        10.0, gt=0, le=300,
        description="How long one connection attempt may take; the very first connect of a stream is tried for this "
        "long, then the stream fails (UNAVAILABLE) rather than retrying a URL that never worked.",
    )
    read_timeout_s: float = Field(10.0, gt=0, le=300, description="No packet from a connected source for this long counts as a drop (reconnect).")
    first_frame_timeout_s: float = Field(
        15.0, gt=0, le=600,
        description="A source connected for the first time that yields no decodable video frame (no keyframe, an unknown "
        "codec) within this long fails (INVALID_ARGUMENT).",
    )
    reconnect_initial_s: float = Field(0.5, gt=0, le=60, description="First delay before reconnecting after a drop; doubles per attempt, with jitter.")
    reconnect_max_s: float = Field(10.0, gt=0, le=600, description="Cap of the reconnect backoff.")
    give_up_after_s: float = Field(300.0, gt=0, le=86_400, description="A source offline this long in a row fails the stream (UNAVAILABLE).")
    max_upload_bytes: int = Field(2 * GiB, ge=1024, description="Largest single upload (bytes); a larger one is refused (RESOURCE_EXHAUSTED).")
    tenant_max_upload_bytes: int = Field(
        4 * GiB, ge=1024,
        description="Bytes of one tenant's uploads spooled at once on one replica; beyond it an upload is refused (RESOURCE_EXHAUSTED).",
    )
    upload_dir: Path | None = Field(None, description="Where uploads are spooled while they are pulled; the system temporary directory when unset.")
    ca_file: Path | None = Field(
        None,
        description="PEM bundle of extra certificate authorities trusted for https:// sources (an internal CA); the system's "
        "defaults otherwise.",
    )
    max_redirects: int = Field(5, ge=0, le=20, description="HTTP redirects followed for an http(s) source; every hop's address is checked like the URL's.")
    max_pulled_streams_per_tenant: int = Field(16, ge=1, le=10_000, description="Pulled streams (URLs and uploads) one tenant may have on one ingest replica.")
    max_pulled_streams: int = Field(64, ge=1, le=10_000, description="Pulled streams on one ingest replica, all tenants together.")
    decode_threads: int = Field(
        0, ge=0, le=64,
        description="Decoder threads per pulled stream (0: FFmpeg's choice, frame threads for the cores). 1 saves memory and "
        "threads when one replica pulls many low-resolution cameras (docs/benchmarks.md, pulled RTSP cameras).",
    )

    @field_validator("allowed_schemes")
    @classmethod
    def _schemes(cls, value: str) -> str:
        schemes = [s.strip().lower() for s in value.split(",") if s.strip()]
        unknown = sorted(set(schemes) - KNOWN_SCHEMES)
        if unknown:
            raise ValueError(f"SH_SOURCE_ALLOWED_SCHEMES names {', '.join(unknown)}: a source may only use "
                             f"{', '.join(sorted(KNOWN_SCHEMES))}")
        if not schemes:
            raise ValueError("SH_SOURCE_ALLOWED_SCHEMES is empty: name at least one scheme")
        return ",".join(schemes)

    @field_validator("allowed_networks", "denied_networks")
    @classmethod
    def _networks(cls, value: str, info) -> str:
        from streamharness.sources.policy import parse_networks

        parse_networks(value, f"SH_SOURCE_{info.field_name.upper()}")  # raises ValueError naming the variable
        return value

    @model_validator(mode="after")
    def _backoff(self) -> SourceSettings:
        if self.reconnect_initial_s > self.reconnect_max_s:
            raise ValueError(f"SH_SOURCE_RECONNECT_INITIAL_S ({self.reconnect_initial_s:g}) is above "
                             f"SH_SOURCE_RECONNECT_MAX_S ({self.reconnect_max_s:g})")
        if self.max_upload_bytes > self.tenant_max_upload_bytes:
            raise ValueError(f"SH_SOURCE_MAX_UPLOAD_BYTES ({self.max_upload_bytes}) is above "
                             f"SH_SOURCE_TENANT_MAX_UPLOAD_BYTES ({self.tenant_max_upload_bytes}): no upload that large could be taken")
        if self.max_pulled_streams_per_tenant > self.max_pulled_streams:
            raise ValueError(f"SH_SOURCE_MAX_PULLED_STREAMS_PER_TENANT ({self.max_pulled_streams_per_tenant}) is above "
                             f"SH_SOURCE_MAX_PULLED_STREAMS ({self.max_pulled_streams})")
        return self

    @property
    def scheme_set(self) -> frozenset[str]:
        return frozenset(self.allowed_schemes.split(","))
