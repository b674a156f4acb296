"""redisconn's pure logic: redaction, refusal classification, TLS option checks."""

from __future__ import annotations

import ssl
from pathlib import Path

import hiredis
import pytest
from redis.exceptions import AuthenticationError, NoPermissionError
from redis.exceptions import ConnectionError as RedisConnectionError

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.redisconn import RedisTLS, describe, redact, refusal, scrub


def test_redact_hides_the_password_and_keeps_the_rest() -> None:
    assert redact("redis://gateway:s3cr%40t@redis:6379/0") == "redis://gateway:***@redis:6379/0"
    assert redact("rediss://:pw@[::1]:6380/2") == "rediss://:***@[::1]:6380/2"
    assert redact("redis://redis:6379/0") == "redis://redis:6379/0"
    url = "redis://u:s3cr%40t@h:1/0"
    assert scrub("failed: s3cr@t and s3cr%40t", url) == "failed: *** and ***"


def test_refusals_are_told_apart_from_outages() -> None:
    assert refusal(NoPermissionError("this user has no permissions to run the 'mget' command"))
    assert refusal(hiredis.ReplyError("NOPERM this user has no permissions")).startswith(
        "Redis ACL denied a command (NOPERM)"
    )
    assert "credentials" in (refusal(AuthenticationError("invalid username-password")) or "")
    assert "credentials" in (refusal(hiredis.ReplyError("WRONGPASS invalid")) or "")
    wrapped = RedisConnectionError(
        "Error 1 connecting to h:1. [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
        "failed: unable to get local issuer certificate (_ssl.c:1006)."
    )
    assert describe(wrapped).startswith(
        "TLS: Redis's certificate is not trusted (unable to get local issuer certificate)"
    )
    verify = ssl.SSLCertVerificationError(1, "verify failed")
    verify.verify_message = "self-signed certificate"
    assert "self-signed certificate" in (refusal(verify) or "")
    assert refusal(RedisConnectionError("Error 111 connecting. Connection refused.")) is None
    assert refusal(TimeoutError()) is None


def test_tls_files_must_exist_and_fit_the_url(tmp_path: Path) -> None:
    ca = tmp_path / "ca.crt"
    ca.write_text("x")
    RedisTLS(ca).check("rediss://h:1/0")
    assert RedisTLS(ca).redis_kwargs("rediss://h:1/0") == {"ssl_ca_certs": str(ca)}
    assert RedisTLS(ca).redis_kwargs("redis://h:1/0") == {}
    with pytest.raises(ConfigError, match="not rediss://"):
        RedisTLS(ca).check("redis://u:pw@h:1/0")
    with pytest.raises(ConfigError, match="GATEWAY_REDIS_TLS_CA_FILE"):
        RedisTLS(tmp_path / "missing").check("rediss://h:1/0")
    with pytest.raises(ConfigError, match="needs its certificate"):
        RedisTLS(key_file=ca).check("rediss://h:1/0")


def test_settings_errors_never_show_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", "http://gateway:Sup3rSecret@h:1/0")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "GATEWAY_REDIS_URL" in str(info.value) and "Sup3rSecret" not in str(info.value)
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://gateway:Sup3rSecret@h:1/0")
    monkeypatch.setenv("GATEWAY_REDIS_TLS_CA_FILE", "/nonexistent/ca.crt")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "does not exist" in str(info.value) and "Sup3rSecret" not in str(info.value)
