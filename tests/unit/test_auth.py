"""Authentication pieces by hand-made cases: internal identity tokens, the hashed keys file and its
reload, rate buckets, the keys CLI."""

from __future__ import annotations

import json
import time

import pytest
from typer.testing import CliRunner

from streamharness.auth import (
    AuthSettings,
    InternalTokens,
    TenantAuth,
    add_api_key,
    check_owner,
    hash_key,
    key_id,
    new_api_key,
    parse_api_keys,
    remove_api_key,
)
from streamharness.cli import app
from streamharness.errors import NotFound, SettingsError, Unauthenticated
from streamharness.limits import Buckets, TokenBucket

SECRET = "unit-test-internal-secret-of-32-characters"


def tokens(service: str = "gateway", ttl: float = 300.0, secret: str = SECRET) -> InternalTokens:
    return InternalTokens(AuthSettings(internal_secret=secret, internal_token_ttl_s=ttl, clock_skew_s=0), service)


def test_an_internal_token_proves_its_tenant_to_its_audience_only():
    t = tokens()
    token = t.mint("acme", "memory")
    identity = tokens("memory").verify(token, "memory")
    assert (identity.tenant, identity.issuer) == ("acme", "gateway")
    assert t.mint("acme", "memory") == token  # cached until 80 % of its life
    with pytest.raises(Unauthenticated, match="Audience doesn't match"):
        t.verify(token, "ingest")
    with pytest.raises(Unauthenticated, match="Signature verification failed"):
        tokens(secret="x" * 40).verify(token, "memory")
    with pytest.raises(Unauthenticated, match="no x-sh-identity metadata"):
        t.verify(None, "memory")
    tampered = token[:-4] + ("AAAA" if not token.endswith("AAAA") else "BBBB")
    with pytest.raises(Unauthenticated):
        t.verify(tampered, "memory")


def test_an_expired_internal_token_is_refused():
    t = tokens(ttl=10)
    import jwt

    old = jwt.encode({"iss": "gateway", "aud": "memory", "sub": "acme", "iat": int(time.time()) - 100,
                      "exp": int(time.time()) - 50}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated, match="Signature has expired"):
        t.verify(old, "memory")
    no_tenant = jwt.encode({"iss": "gateway", "aud": "memory", "exp": int(time.time()) + 50}, SECRET, algorithm="HS256")
    with pytest.raises(Unauthenticated, match="sub"):
        t.verify(no_tenant, "memory")


def test_services_refuse_to_start_without_a_long_enough_secret():
    with pytest.raises(SettingsError, match="SH_AUTH_INTERNAL_SECRET is not set"):
        InternalTokens(AuthSettings(internal_secret=None), "ingest")
    with pytest.raises(ValueError, match="at least 32 characters"):
        AuthSettings(internal_secret="short")


def test_another_tenants_stream_is_not_found():
    identity = tokens("memory").verify(tokens().mint("acme", "memory"), "memory")
    check_owner(identity, "acme", "cam", "memory")
    with pytest.raises(NotFound, match="memory has no stream 'cam'"):
        check_owner(identity, "globex", "cam", "memory")


def test_the_keys_file_holds_hashes_and_reloads(tmp_path):
    path = tmp_path / "keys.json"
    a, b = new_api_key(), new_api_key()
    add_api_key(path, "acme", a)
    add_api_key(path, "acme", b)
    text = path.read_text()
    assert a not in text and b not in text and hash_key(a) in text
    assert parse_api_keys(path) == {hash_key(a): "acme", hash_key(b): "acme"}
    auth = TenantAuth(path, None, reload_s=0.0, allow_anonymous=False)
    assert auth.tenant((("x-api-key", a),)) == auth.tenant((("x-api-key", b),)) == "acme"
    assert remove_api_key(path, "acme", key_id(hash_key(a))) == 1
    with pytest.raises(Unauthenticated, match="unknown API key"):
        auth.tenant((("x-api-key", a),))
    assert auth.tenant((("x-api-key", b),)) == "acme"
    path.write_text("[broken")  # a bad file keeps what was read before
    assert auth.tenant((("x-api-key", b),)) == "acme"


@pytest.mark.parametrize(("content", "words"), [
    ('{"acme": ["' + "sh_plaintext-key" + '"]}', "store hashes, never keys"),
    ('{"acme": "sha256:00"}', "expected a list of key hashes"),
    ('{"a/b": []}', "tenant 'a/b' is invalid"),
    ('["x"]', "must be a JSON object"),
    ('{"acme": ["sha256:' + "0" * 64 + '"], "globex": ["sha256:' + "0" * 64 + '"]}', "listed for two tenants"),
])
def test_a_bad_keys_file_fails_start_with_what_is_wrong(tmp_path, content, words):
    path = tmp_path / "keys.json"
    path.write_text(content)
    with pytest.raises(SettingsError, match=words):
        TenantAuth(path, None, reload_s=1.0, allow_anonymous=False)


def test_no_way_to_authenticate_fails_start_unless_anonymous_is_asked_for():
    with pytest.raises(SettingsError, match="SH_GATEWAY_API_KEYS_FILE"):
        TenantAuth(None, None, reload_s=1.0, allow_anonymous=False)
    auth = TenantAuth(None, None, reload_s=1.0, allow_anonymous=True)
    assert auth.tenant((("x-tenant", "acme"),)) == "acme" and auth.tenant(()) == "default"


def test_token_buckets_say_when_the_next_token_comes():
    bucket = TokenBucket(rate=2.0, burst=3, stamp=0.0)
    assert [bucket.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert bucket.take(0.0) == pytest.approx(0.5)
    assert bucket.take(0.5) == 0.0  # one token refilled
    assert bucket.take(0.5) == pytest.approx(0.5)
    tenants = Buckets(rate=1.0, burst=1, max_names=2)
    assert tenants.take("a", 0.0) == 0.0 and tenants.take("a", 0.0) == pytest.approx(1.0)
    assert tenants.take("b", 0.0) == 0.0  # another tenant has its own bucket


def test_the_keys_cli_adds_lists_and_removes(tmp_path):
    path = tmp_path / "keys.json"
    runner = CliRunner()
    made = runner.invoke(app, ["keys", "new", "--tenant", "acme", "--file", str(path)])
    assert made.exit_code == 0, made.output
    key = made.stdout.strip().splitlines()[0]
    assert key.startswith("sh_") and key not in path.read_text()
    listed = runner.invoke(app, ["keys", "list", "--file", str(path)])
    assert listed.stdout.strip() == f"acme: {key_id(hash_key(key))}"
    assert runner.invoke(app, ["keys", "remove", "--tenant", "acme", "--key-id", key_id(hash_key(key)), "--file", str(path)]).exit_code == 0
    assert json.loads(path.read_text()) == {"acme": []}
    assert runner.invoke(app, ["keys", "remove", "--tenant", "acme", "--key-id", "abc", "--file", str(path)]).exit_code != 0
