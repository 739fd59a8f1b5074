"""Who is calling: tenants at the gateway, and the tenant on every internal hop.

**At the gateway** a caller proves its tenant with either

- an API key (metadata ``x-api-key``). Keys are stored hashed — a JSON file
  ``{"<tenant>": ["sha256:<hex>", ...]}`` (``SH_GATEWAY_API_KEYS_FILE``), several per tenant so a key
  is rotated by adding the new one, moving clients, removing the old one. The file is re-read when
  it changes (checked every ``SH_GATEWAY_AUTH_RELOAD_S``): a Kubernetes Secret mounted as a
  directory is updated in place, so rotation needs no restart. A file that does not parse keeps the
  keys read before it (and says so in the log). Keys are random (``streamharness keys new``), so a
  plain SHA-256 is the right hash: no password stretching is needed for 256 bits of entropy.
- or a JWT from a configured issuer (metadata ``authorization: Bearer <jwt>``), its tenant in a
  claim (``SH_GATEWAY_JWT_ISSUERS_FILE``).

**Between services** the gateway (and every stage acting for a stream) sends a short-lived
*internal identity token* (metadata ``x-sh-identity``): a JWT signed with HMAC-SHA256 under
``SH_AUTH_INTERNAL_SECRET``, naming the tenant, the calling service and the service it is for
(``aud``), valid ``SH_AUTH_INTERNAL_TOKEN_TTL_S``. Ingest and memory refuse a call without a valid
one (UNAUTHENTICATED) and answer NOT_FOUND for a stream of another tenant. A signed token rather
than mTLS with the tenant in plain metadata: mTLS proves *which service* calls, not *for which
tenant* — a service's bug or a stolen pod identity could still name any tenant in metadata — and it
needs a certificate authority on every install; the token carries the tenant itself, signed,
expiring, checked in a few microseconds, and works the same here and in any cluster. (mTLS can be
added on top: ``SH_GRPC_TLS_*``.) Every service that acts for streams holds the secret, so the
NetworkPolicies (the chart) bound who can reach ingest and memory at all.

Refusals go to the audit log (:func:`audit`): structured, one JSON object per event, no secrets
(a key is named by the first 12 hex digits of its hash).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from pydantic import BaseModel, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from streamharness.errors import InvalidInput, NotFound, SettingsError, Unauthenticated
from streamharness.keys import validate_name

log = logging.getLogger(__name__)
audit_log = logging.getLogger("streamharness.audit")

API_KEY_METADATA = "x-api-key"
AUTHORIZATION_METADATA = "authorization"
IDENTITY_METADATA = "x-sh-identity"
_HASH_PREFIX = "sha256:"
_INTERNAL_ALGORITHM = "HS256"


def audit(event: str, **fields: Any) -> None:
    """One structured audit record (``streamharness.audit`` logger): what happened, to whom, why.
    Never pass a secret; name keys by :func:`key_id`."""
    record = {"audit": event, **{k: v for k, v in fields.items() if v is not None}}
    audit_log.warning(json.dumps(record, sort_keys=True))


def hash_key(api_key: str) -> str:
    return _HASH_PREFIX + hashlib.sha256(api_key.encode()).hexdigest()


def key_id(api_key_hash: str) -> str:
    """A name for a key in logs: the first 12 hex digits of its hash (not the key)."""
    return api_key_hash.removeprefix(_HASH_PREFIX)[:12]


def new_api_key() -> str:
    return "sh_" + secrets.token_urlsafe(32)


class AuthSettings(BaseSettings):
    """The internal identity token every service sends and checks."""

    model_config = SettingsConfigDict(env_prefix="SH_AUTH_", frozen=True, extra="forbid")

    internal_secret: SecretStr | None = Field(None, description="HMAC-SHA256 key of the internal identity tokens (at least 32 characters), the same in every service: mount it from a Kubernetes Secret (the chart makes one). Unset: the services that check identities (ingest, memory) and those that send them refuse to start.")
    internal_token_ttl_s: float = Field(300.0, ge=10, le=86_400, description="Lifetime of one internal identity token; senders renew them at 80 % of it.")
    clock_skew_s: float = Field(30.0, ge=0, le=600, description="Clock difference between pods tolerated when a token's expiry is checked.")

    @field_validator("internal_secret")
    @classmethod
    def _long_enough(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and len(value.get_secret_value()) < 32:
            raise ValueError("must be at least 32 characters")
        return value


@dataclass(frozen=True)
class Identity:
    tenant: str
    issuer: str  # the service that signed it


class InternalTokens:
    """Mint and verify internal identity tokens. ``service``: this service's name (the issuer)."""

    def __init__(self, settings: AuthSettings, service: str) -> None:
        if settings.internal_secret is None:
            raise SettingsError("SH_AUTH_INTERNAL_SECRET is not set: internal calls carry the tenant in a token "
                                "signed with it (the same value in every service)")
        self._secret = settings.internal_secret.get_secret_value().encode()
        self._ttl = settings.internal_token_ttl_s
        self._skew = settings.clock_skew_s
        self.service = service
        self._cache: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def mint(self, tenant: str, audience: str) -> str:
        now = time.time()
        with self._lock:
            cached = self._cache.get((tenant, audience))
            if cached is not None and now < cached[1]:
                return cached[0]
        token = jwt.encode({"iss": self.service, "aud": audience, "sub": tenant, "iat": int(now),
                            "exp": int(now + self._ttl)}, self._secret, algorithm=_INTERNAL_ALGORITHM)
        with self._lock:
            if len(self._cache) > 10_000:
                self._cache.clear()
            self._cache[(tenant, audience)] = (token, now + 0.8 * self._ttl)
        return token

    def metadata(self, tenant: str, audience: str) -> tuple[tuple[str, str], ...]:
        """Call metadata that proves ``tenant`` to ``audience``."""
        return ((IDENTITY_METADATA, self.mint(tenant, audience)),)

    def verify(self, token: str | None, audience: str, *, method: str | None = None, peer: str | None = None) -> Identity:
        """The identity a token proves, or ``Unauthenticated`` (audited) saying why not."""
        if not token:
            audit("identity_refused", reason="no identity token", audience=audience, method=method, peer=peer)
            raise Unauthenticated(f"{audience}: no {IDENTITY_METADATA} metadata; internal calls carry a signed identity token")
        try:
            claims = jwt.decode(token, self._secret, algorithms=[_INTERNAL_ALGORITHM], audience=audience,
                                leeway=self._skew, options={"require": ["exp", "aud", "sub", "iss"]})
            tenant = validate_name("tenant", claims["sub"])
        except (jwt.PyJWTError, ValueError) as err:
            audit("identity_refused", reason=f"{type(err).__name__}: {err}", audience=audience, method=method, peer=peer)
            raise Unauthenticated(f"{audience}: the identity token is not valid ({err})") from None
        return Identity(tenant=tenant, issuer=str(claims["iss"]))


@dataclass(frozen=True)
class ResumeClaim:
    """What a verified resume token says: whose session of which stream, at which decision rate."""

    tenant: str
    stream_id: str
    session_id: str
    decision_fps: float
    origin_unix_ms: int = 0  # a pulled live source: wall time of its media time 0


class ResumeTokens:
    """Resume tokens (SessionAccepted.resume_token): an HS256 JWT under the internal secret, so any
    gateway replica can verify a token another one issued. It names the tenant, the stream and the
    session; whether the session can still be resumed is the decision stage's to say (it keeps an
    away session's state for SH_DECISION_AWAY_KEEP_S)."""

    AUDIENCE = "streamharness-resume"
    LIFETIME_S = 7 * 86_400

    def __init__(self, settings: AuthSettings) -> None:
        if settings.internal_secret is None:
            raise SettingsError("SH_AUTH_INTERNAL_SECRET is not set: resume tokens are signed with it")
        self._secret = settings.internal_secret.get_secret_value().encode()

    def mint(self, tenant: str, stream_id: str, session_id: str, decision_fps: float, origin_unix_ms: int = 0) -> str:
        """``origin_unix_ms``: wall time of media time 0 of a pulled live source (a resume goes on from there)."""
        now = int(time.time())
        return jwt.encode({"aud": self.AUDIENCE, "sub": tenant, "stream": stream_id, "sid": session_id, "fps": decision_fps,
                           "org": origin_unix_ms, "iat": now, "exp": now + self.LIFETIME_S}, self._secret, algorithm=_INTERNAL_ALGORITHM)

    def verify(self, token: str, tenant: str, stream_id: str) -> ResumeClaim:
        """The claim of ``token`` for ``tenant``'s ``stream_id``; ``InvalidInput`` saying why not
        (a token of another tenant or stream is refused like a forged one, and audited)."""
        try:
            claims = jwt.decode(token, self._secret, algorithms=[_INTERNAL_ALGORITHM], audience=self.AUDIENCE,
                                options={"require": ["exp", "aud", "sub", "sid", "stream"]})
        except jwt.PyJWTError as err:
            audit("resume_refused", reason=f"{type(err).__name__}: {err}", tenant=tenant, stream=stream_id)
            raise InvalidInput(f"resume_token is not valid ({err}); start a new session without it") from None
        if claims["sub"] != tenant or claims["stream"] != stream_id:
            audit("resume_refused", reason="token of another tenant or stream", tenant=tenant, stream=stream_id)
            raise InvalidInput(f"resume_token is not a token of stream {stream_id}; start a new session without it")
        return ResumeClaim(tenant, stream_id, str(claims["sid"]), float(claims.get("fps") or 0.0), int(claims.get("org") or 0))


def metadata_value(metadata: Iterable[tuple[str, Any]] | None, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


def caller(tokens: InternalTokens, context: Any, audience: str) -> Identity:
    """The verified identity of an internal call (``context``: a gRPC servicer context)."""
    return tokens.verify(metadata_value(context.invocation_metadata(), IDENTITY_METADATA), audience,
                         method=_method(context), peer=_peer(context))


def check_owner(identity: Identity, tenant: str, stream_id: str, what: str) -> None:
    """A caller of one tenant asking about another tenant's stream: NOT_FOUND, never its data."""
    if identity.tenant != tenant:
        audit("tenant_mismatch", caller_tenant=identity.tenant, stream_tenant=tenant, issuer=identity.issuer, what=what)
        raise NotFound(f"{what} has no stream {stream_id!r}")


def _method(context: Any) -> str | None:
    try:
        details = context.method() if hasattr(context, "method") else None
        return (details.decode() if isinstance(details, bytes) else str(details)) if details else None
    except Exception:  # noqa: BLE001 - only for the log
        return None


def _peer(context: Any) -> str:
    try:
        return str(context.peer())
    except Exception:  # noqa: BLE001
        return ""


# -- the gateway's tenants ---------------------------------------------------------------------------


class JwtIssuer(BaseModel):
    """One accepted issuer of tenant JWTs (an entry of ``SH_GATEWAY_JWT_ISSUERS_FILE``)."""

    issuer: str = Field(min_length=1)
    audience: str = Field(min_length=1)
    algorithms: list[str] = Field(default_factory=lambda: ["RS256"])
    #: PEM public key (file path, relative to the issuers file) — or a JWKS URL; exactly one.
    public_key_file: str | None = None
    jwks_url: str | None = None
    tenant_claim: str = "tenant"


class _Watched:
    """A file re-read when its (mtime, size, inode) changes, checked at most every ``interval`` s."""

    def __init__(self, path: Path, interval: float, parse: Any, what: str) -> None:
        self.path, self.interval, self.parse, self.what = path, interval, parse, what
        self._stamp: tuple[int, int, int] | None = None
        self._checked = 0.0
        self._lock = threading.Lock()
        self.value: Any = None
        self.reload(initial=True)

    def _file_stamp(self) -> tuple[int, int, int]:
        st = os.stat(self.path)  # follows the ..data symlink of a mounted Secret
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def reload(self, initial: bool = False) -> None:
        try:
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            value = self.parse(self.path)
        except (OSError, ValueError) as err:
            if initial:
                raise SettingsError(f"{self.what} {self.path}: {err}") from None
            log.error("%s %s could not be re-read (%s); keeping the version read before", self.what, self.path, err)
            audit("auth_config_reload_failed", file=str(self.path), reason=str(err))
            return
        self.value, self._stamp = value, stamp
        if not initial:
            log.info("%s %s re-read", self.what, self.path)
            audit("auth_config_reloaded", file=str(self.path))

    def get(self) -> Any:
        now = time.monotonic()
        if now - self._checked >= self.interval:
            with self._lock:
                if now - self._checked >= self.interval:
                    self._checked = now
                    self.reload()
        return self.value


def _hash_owners(data: Any) -> dict[str, str]:
    """A keys file's content checked → hash → tenant; ``ValueError`` saying what is wrong."""
    if not isinstance(data, dict):
        raise ValueError('must be a JSON object {"<tenant>": ["sha256:<hex>", ...]}')
    by_hash: dict[str, str] = {}
    for tenant, hashes in data.items():
        try:
            validate_name("tenant", tenant)
        except InvalidInput as err:
            raise ValueError(str(err)) from None
        if not isinstance(hashes, list) or not all(isinstance(h, str) for h in hashes):
            raise ValueError(f"tenant {tenant!r}: expected a list of key hashes")
        for h in hashes:
            digest = h.removeprefix(_HASH_PREFIX)
            if not h.startswith(_HASH_PREFIX) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
                raise ValueError(f"tenant {tenant!r}: {h[:16]!r}... is not sha256:<64 hex digits> (store hashes, never keys)")
            if by_hash.setdefault(h, tenant) != tenant:
                raise ValueError(f"one key hash is listed for two tenants ({by_hash[h]!r} and {tenant!r})")
    return by_hash


def read_api_keys(path: Path) -> dict[str, list[str]]:
    """The keys file as it is (tenant → hashes), checked."""
    data = json.loads(path.read_text())
    _hash_owners(data)
    return data


def parse_api_keys(path: Path) -> dict[str, str]:
    """``{"<tenant>": ["sha256:<hex>", ...]}`` → hash → tenant."""
    return _hash_owners(json.loads(path.read_text()))


def _parse_issuers(path: Path) -> list[tuple[JwtIssuer, Any]]:
    raw = json.loads(path.read_text())
    if not isinstance(raw, list):
        raise ValueError("must be a JSON list of issuers")
    out = []
    for item in raw:
        issuer = JwtIssuer.model_validate(item)
        if (issuer.public_key_file is None) == (issuer.jwks_url is None):
            raise ValueError(f"issuer {issuer.issuer!r}: give exactly one of public_key_file and jwks_url")
        if issuer.public_key_file is not None:
            key_path = Path(issuer.public_key_file)
            key: Any = (key_path if key_path.is_absolute() else path.parent / key_path).read_text()
        else:
            key = jwt.PyJWKClient(issuer.jwks_url, cache_keys=True, lifespan=300)
        out.append((issuer, key))
    return out


class TenantAuth:
    """The gateway's authentication: API keys, JWTs, or (development only) anonymous callers."""

    def __init__(self, api_keys_file: Path | None, jwt_issuers_file: Path | None, *, reload_s: float,
                 allow_anonymous: bool) -> None:
        if api_keys_file is None and jwt_issuers_file is None and not allow_anonymous:
            raise SettingsError("the gateway has no way to authenticate tenants: set SH_GATEWAY_API_KEYS_FILE "
                                "and/or SH_GATEWAY_JWT_ISSUERS_FILE (or SH_GATEWAY_ALLOW_ANONYMOUS=true for development)")
        self._keys = _Watched(api_keys_file, reload_s, parse_api_keys, "API keys file") if api_keys_file else None
        self._issuers = _Watched(jwt_issuers_file, reload_s, _parse_issuers, "JWT issuers file") if jwt_issuers_file else None
        self.anonymous = api_keys_file is None and jwt_issuers_file is None

    def tenant(self, metadata: Sequence[tuple[str, Any]] | None, *, peer: str = "") -> str:
        """The caller's tenant, or ``Unauthenticated`` (audited) saying what was missing or wrong."""
        if self.anonymous:
            return validate_name("tenant", metadata_value(metadata, "x-tenant") or "default")
        api_key = metadata_value(metadata, API_KEY_METADATA)
        bearer = metadata_value(metadata, AUTHORIZATION_METADATA)
        if not api_key and bearer and self._keys is not None:
            # "Authorization: Bearer <API key>" as OpenAI-style clients send it: a key is never a JWT (no dots).
            scheme, _, token = bearer.partition(" ")
            if scheme.lower() == "bearer" and token and token.count(".") != 2:
                api_key, bearer = token.strip(), None
        if api_key and self._keys is not None:
            digest = hash_key(api_key)
            tenant = self._keys.get().get(digest)
            if tenant is None:
                audit("auth_failed", reason="unknown API key", key_id=key_id(digest), peer=peer)
                raise Unauthenticated("unknown API key")
            return tenant
        if bearer and self._issuers is not None:
            return self._jwt_tenant(bearer, peer)
        wanted = " or ".join(w for w, on in ((f"{API_KEY_METADATA} metadata", self._keys), ("authorization: Bearer <JWT>", self._issuers)) if on)
        audit("auth_failed", reason="no credentials", peer=peer)
        raise Unauthenticated(f"no credentials: send {wanted}")

    def _jwt_tenant(self, bearer: str, peer: str) -> str:
        scheme, _, token = bearer.partition(" ")
        if scheme.lower() != "bearer" or not token:
            audit("auth_failed", reason="authorization is not 'Bearer <JWT>'", peer=peer)
            raise Unauthenticated("authorization metadata must be 'Bearer <JWT>'")
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError as err:
            audit("auth_failed", reason=f"malformed JWT: {err}", peer=peer)
            raise Unauthenticated(f"malformed JWT ({err})") from None
        for issuer, key in self._issuers.get():
            if unverified.get("iss") != issuer.issuer:
                continue
            try:
                signing_key = key.get_signing_key_from_jwt(token).key if isinstance(key, jwt.PyJWKClient) else key
                claims = jwt.decode(token, signing_key, algorithms=issuer.algorithms, audience=issuer.audience,
                                    issuer=issuer.issuer, leeway=30, options={"require": ["exp", "iss", "aud"]})
                tenant = claims.get(issuer.tenant_claim)
                if not isinstance(tenant, str):
                    raise jwt.InvalidTokenError(f"no {issuer.tenant_claim!r} claim")
                return validate_name("tenant", tenant)
            except (jwt.PyJWTError, ValueError) as err:
                audit("auth_failed", reason=f"JWT refused: {err}", issuer=issuer.issuer, peer=peer)
                raise Unauthenticated(f"JWT refused ({err})") from None
        audit("auth_failed", reason="JWT from an issuer not configured", issuer=str(unverified.get("iss")), peer=peer)
        raise Unauthenticated(f"JWT issuer {unverified.get('iss')!r} is not accepted here")


def _write_api_keys(path: Path, data: dict[str, list[str]]) -> None:
    """Replace the keys file atomically (a reader sees the old file or the new one, never half)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def add_api_key(path: Path, tenant: str, api_key: str) -> str:
    """Append ``api_key``'s hash to ``tenant`` in the keys file (created if missing), atomically.
    A file that is not a keys file is an error, not something to add to."""
    validate_name("tenant", tenant)
    data = read_api_keys(path) if path.exists() else {}
    digest = hash_key(api_key)
    data.setdefault(tenant, [])
    if digest not in data[tenant]:
        data[tenant].append(digest)
    _write_api_keys(path, data)
    return digest


def remove_api_key(path: Path, tenant: str, key_or_id: str) -> int:
    """Remove the keys of ``tenant`` whose hash is ``key_or_id`` or starts with it (a key id); how many."""
    data = read_api_keys(path)
    before = data.get(tenant, [])
    wanted = key_or_id if key_or_id.startswith(_HASH_PREFIX) else _HASH_PREFIX + key_or_id
    kept = [h for h in before if not h.startswith(wanted)]
    data[tenant] = kept
    _write_api_keys(path, data)
    return len(before) - len(kept)
