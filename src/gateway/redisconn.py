"""Redis connection options in one place: URL, TLS files, and what may be shown of them.

Every Redis client the project makes gets its options here, so TLS and credentials are
handled alike everywhere: the gateway's redis-py pool and its raw RESP pool
(``features/resp.py``), the Feast store, ``gateway features load``, ``gateway features
import``, and any other offline tool (:func:`sync_client`).

* **TLS**: a ``rediss://`` URL turns it on; :class:`RedisTLS` adds a CA file and an
  optional client certificate and key (``GATEWAY_REDIS_TLS_CA_FILE``, ``_CERT_FILE``,
  ``_KEY_FILE``). The server's certificate is always verified, host name included
  (redis-py's defaults); the same options reach redis-py as ``ssl_*`` keyword
  arguments and the raw pool through ``resp.tls_context``.
* **Credentials** travel only in the URL (``redis://user:password@host:port/db``), which
  comes from a Kubernetes Secret (docs/security.md). Anything shown to a person -- a
  log line, ``/readyz``, an error message -- goes through :func:`redact` /
  :func:`describe`, which never print the password.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from gateway.errors import ConfigError

TLS_SCHEMES = ("rediss",)
CHECK_CA = "check the CA file (GATEWAY_REDIS_TLS_CA_FILE, --tls-ca-file)"


def is_tls(url: str) -> bool:
    return urlsplit(url).scheme in TLS_SCHEMES


@dataclass(frozen=True)
class RedisTLS:
    """TLS files for a ``rediss://`` URL; all optional (the system CAs when no CA file)."""

    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None

    @classmethod
    def from_settings(cls, settings: Any) -> RedisTLS:
        return cls(
            settings.redis_tls_ca_file, settings.redis_tls_cert_file, settings.redis_tls_key_file
        )

    @property
    def given(self) -> bool:
        return any((self.ca_file, self.cert_file, self.key_file))

    def check(self, url: str | None) -> None:
        """ConfigError (one line) when the files do not fit the URL or each other."""
        if self.key_file and not self.cert_file:
            raise ConfigError(
                "a Redis TLS client key needs its certificate "
                "(GATEWAY_REDIS_TLS_CERT_FILE, --tls-cert-file)"
            )
        for name, path in (("CA", self.ca_file), ("CERT", self.cert_file), ("KEY", self.key_file)):
            if path is not None and not Path(path).is_file():
                raise ConfigError(
                    f"Redis TLS {name.lower()} file {path} does not exist "
                    f"(GATEWAY_REDIS_TLS_{name}_FILE, --tls-{name.lower()}-file)"
                )
        if self.given and url is not None and not is_tls(url):
            raise ConfigError(
                f"Redis TLS files are set but the Redis URL {redact(url)} is not rediss://"
            )

    def redis_kwargs(self, url: str) -> dict[str, Any]:
        """redis-py's ``ssl_*`` keyword arguments for ``url`` (none for a plain URL)."""
        if not is_tls(url):
            return {}
        kwargs: dict[str, Any] = {}
        if self.ca_file:
            kwargs["ssl_ca_certs"] = str(self.ca_file)
        if self.cert_file:
            kwargs["ssl_certfile"] = str(self.cert_file)
        if self.key_file:
            kwargs["ssl_keyfile"] = str(self.key_file)
        return kwargs


NO_TLS = RedisTLS()


def redact(url: str) -> str:
    """``url`` with its password (if any) replaced by ``***``; the user name stays."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        user = parts.username or ""
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{user}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "<unparsable redis URL>"


def password_of(url: str | None) -> str | None:
    if not url:
        return None
    try:
        pw = urlsplit(url).password
    except ValueError:
        return None
    return unquote(pw) if pw else None


def scrub(text: str, url: str | None) -> str:
    """``text`` with ``url``'s password, raw or percent-decoded, replaced by ``***``."""
    if not url:
        return text
    try:
        raw = urlsplit(url).password
    except ValueError:
        return text
    for secret in {raw, password_of(url)}:
        if secret:
            text = text.replace(secret, "***")
    return text


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in seen:
        seen.append(cur)
        cur = cur.__cause__ or cur.__context__
    return seen


def refusal(exc: BaseException) -> str | None:
    """Why Redis refused us, if it did: TLS trust, credentials or an ACL permission.

    None for anything else (an outage, a timeout). These are configuration errors: a
    retry cannot help, and "unreachable" would send an operator looking at the network.
    """
    for e in _chain(exc):
        if isinstance(e, ssl.SSLCertVerificationError):
            why = e.verify_message
            return f"TLS: Redis's certificate is not trusted ({why}); {CHECK_CA}"
        text = str(e)
        if "CERTIFICATE_VERIFY_FAILED" in text:  # redis-py's ConnectionError keeps only text
            m = re.search(r"certificate verify failed: ([^(]+)", text)
            why = m.group(1).strip() if m else "verify failed"
            return f"TLS: Redis's certificate is not trusted ({why}); {CHECK_CA}"
        if isinstance(e, ssl.SSLError) or "[SSL" in text:
            return f"TLS handshake with Redis failed: {getattr(e, 'reason', None) or text}"
        if text.startswith("NOPERM") or type(e).__name__ == "NoPermissionError":
            return f"Redis ACL denied a command (NOPERM): {text.removeprefix('NOPERM ')}"
        if text.startswith(("WRONGPASS", "NOAUTH")) or type(e).__name__ in (
            "AuthenticationError",
            "AuthenticationWrongNumberOfArgsError",
        ):
            return f"Redis refused our credentials (WRONGPASS/NOAUTH): {text}"
    return None


def describe(exc: BaseException, url: str | None = None) -> str:
    """One line for a person: why a Redis call failed, never the password."""
    return scrub(refusal(exc) or f"{type(exc).__name__}: {exc}", url)


def sync_client(
    url: str,
    tls: RedisTLS = NO_TLS,
    *,
    cluster: bool = False,
    connect_timeout_s: float = 2.0,
    socket_timeout_s: float = 10.0,
) -> Any:
    """A synchronous redis-py client for offline tools, checked with one PING.

    ConfigError with one line (password redacted) on a bad URL, TLS files that do not
    fit, an unreachable server, refused credentials or an untrusted certificate.
    redis-py's own retries are off: a tool run by hand should say what is wrong at once.
    """
    import redis
    from redis.backoff import NoBackoff
    from redis.exceptions import RedisClusterException, RedisError
    from redis.retry import Retry

    tls.check(url)
    kwargs: dict[str, Any] = dict(
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 0),
        **tls.redis_kwargs(url),
    )
    shown = redact(url)
    try:
        if cluster:
            client: Any = redis.RedisCluster.from_url(url, **kwargs)
        else:
            client = redis.Redis.from_url(url, **kwargs)
        client.ping()
    except ValueError as exc:
        raise ConfigError(f"bad Redis URL {shown}: {scrub(str(exc), url)}") from exc
    except (RedisError, RedisClusterException, OSError) as exc:
        why = refusal(exc)
        if why is not None:  # a configuration error, not an outage
            raise ConfigError(f"Redis at {shown} refused us: {scrub(why, url)}") from exc
        raise ConfigError(f"cannot reach Redis at {shown}: {describe(exc, url)}") from exc
    return client
