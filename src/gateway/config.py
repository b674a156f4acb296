"""Typed settings from ``GATEWAY_*`` environment variables (pydantic-settings).

Built by the app factory or the CLI and passed in; nothing reads the environment at
import time. Every timeout and retry is explicit here: a library default is a
decision nobody made (redis-py's 5 s socket timeout and 10 retries would blow any
millisecond budget).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal
from urllib.parse import urlparse

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gateway.errors import ConfigError


class Settings(BaseSettings):
    """All gateway settings. Unset ``redis_url`` and ``triton_url`` mean the embedded default."""

    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="ignore", frozen=True)

    # -- backends ----------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        description="redis:// or rediss:// (TLS) URL, credentials included "
        "(redis://user:password@host:6379/0): from a Kubernetes Secret, never a ConfigMap; "
        "unset = in-memory store",
    )
    # TLS for a rediss:// URL (redisconn.py): the server's certificate is always verified.
    redis_tls_ca_file: Path | None = Field(
        None, description="CA bundle that signed Redis's certificate; unset = system CAs"
    )
    redis_tls_cert_file: Path | None = Field(None, description="client certificate (mutual TLS)")
    redis_tls_key_file: Path | None = Field(None, description="the client certificate's key")
    redis_cluster: bool = Field(False, description="treat redis_url as a Redis Cluster node")
    triton_url: str | None = Field(
        None,
        description="Triton: http://host:8000 (HTTP/1.1, the default for new deployments; "
        "http://a:8000,b:8000 or a name resolving to several addresses for round robin), or "
        "gRPC as host:port, grpc://host:port, a comma list of host:port, or dns:///name:port; "
        "unset = in-process onnxruntime",
    )
    model_name: str = Field("ctr", min_length=1)
    model_version: str = Field("", description="Triton model version; empty = latest")
    model_repository: Path | None = Field(None, description="for the embedded backend")

    # -- feature schema and source (docs/own-features.md) ---------------------------------
    schema_file: Path | None = Field(
        None, description="feature schema TOML file; unset = the built-in CTR schema"
    )
    feature_source: Literal["redis", "feast"] = Field(
        "redis",
        description="redis: the gateway's packed layout at GATEWAY_REDIS_URL (in-memory when "
        "unset); feast: a Feast Redis online store, read directly",
    )
    feast_repo: Path | None = Field(
        None, description="Feast repository (the folder of its feature_store.yaml)"
    )

    # -- request limits ----------------------------------------------------------------
    max_items: int = Field(500, ge=1, le=10_000)
    # 500 ids of up to 128 characters (4 bytes each in UTF-8) plus JSON overhead.
    max_body_bytes: int = Field(300_000, ge=1_024)

    # -- budgets (milliseconds) --------------------------------------------------------
    budget_total_ms: float = Field(50.0, gt=0)
    budget_features_ms: float = Field(15.0, gt=0)
    budget_inference_ms: float = Field(30.0, gt=0)
    budget_postprocess_ms: float = Field(5.0, gt=0)

    # -- Redis client (explicit, not redis-py's defaults) ------------------------------
    redis_connect_timeout_ms: float = Field(50.0, gt=0)
    # Backstop only: each call already runs under the features stage's asyncio timeout.
    redis_socket_timeout_ms: float = Field(100.0, gt=0)
    redis_max_connections: int = Field(64, ge=1)

    # -- retries (one layer: ours; redis-py's own retries are off) -----------------------
    retry_max_attempts: int = Field(2, ge=1, le=5, description="attempts per stage, first included")
    retry_backoff_base_ms: float = Field(1.0, ge=0)
    retry_backoff_max_ms: float = Field(5.0, ge=0)
    # Finagle's RetryBudget defaults: 10 s window, a floor of retries per second, and a
    # share of requests that may be retried on top of it.
    retry_budget_ratio: float = Field(0.1, ge=0, le=1)
    retry_budget_min_per_s: float = Field(1.0, ge=0)
    retry_budget_window_s: float = Field(10.0, gt=0)

    # A stage with less than this left is not attempted (fallback, reason "timeout"): no
    # Redis or Triton call can answer in less. Loopback Redis answers an MGET in ~0.3 ms.
    budget_min_attempt_ms: float = Field(1.0, ge=0)
    # Reading the request body, before the budget starts (see api/routes.py): a client
    # that has not sent its whole body by then gets 408. Two seconds covers a 300 kB body
    # over a slow mobile link; a slow sender holds a connection, never an in-flight slot.
    body_timeout_ms: float = Field(2_000.0, gt=0)

    # -- circuit breakers (policy/breaker.py): rate over a window, Hystrix/resilience4j ---
    breaker_failure_rate: float = Field(
        0.5, gt=0, le=1, description="share of failed calls in the window that opens it"
    )
    breaker_min_calls: int = Field(
        20, ge=1, description="calls the window must hold before the rate is judged"
    )
    breaker_window_s: float = Field(10.0, gt=0, description="sliding window length")
    breaker_reset_timeout_s: float = Field(2.0, gt=0, description="how long it stays open")
    breaker_half_open_probes: int = Field(
        3, ge=1, description="probe calls let through half-open; all must succeed to close"
    )
    # A timeout counts against a dependency only if its call had at least this share of
    # the stage's budget (else the client's deadline is to blame) ...
    breaker_min_budget_share: float = Field(0.5, gt=0, le=1)
    # ... and our event loop lagged less than this meanwhile (else we are to blame). The
    # admission controller's lag target: past it, this process is the bottleneck.
    breaker_max_loop_lag_ms: float = Field(5.0, gt=0)

    # -- admission control (policy/admission.py) ------------------------------------------
    max_inflight: int = Field(
        256, ge=1, description="ceiling of the adaptive in-flight limit, per worker"
    )
    # How long a request may wait for an in-flight slot before it is shed. 10 ms = a fifth
    # of the default budget: long enough that a closed-loop client's resend does not come
    # back at once (no 503 storm), short enough to leave the stages most of their time.
    admission_wait_ms: float = Field(10.0, ge=0, le=1_000)

    # -- readiness and dependency health (runtime.py) -----------------------------------
    health_interval_s: float = Field(
        2.0, gt=0, le=60, description="how often Redis and the model are checked in the background"
    )
    start_grace_s: float = Field(
        5.0,
        ge=0,
        le=300,
        description="ready at the latest this long after start, even if the "
        "first dependency check has not finished",
    )

    # -- shutdown ----------------------------------------------------------------------
    drain_delay_s: float = Field(
        0.0,
        ge=0,
        le=300,
        description="after SIGTERM: seconds of serving while not ready, before the listener "
        "closes (so a load balancer that follows /readyz stops sending first). 0 in "
        "Kubernetes, where the preStop sleep does this",
    )

    # -- drift and freshness (drift.py, docs/drift.md) ------------------------------------
    # Half the requests: counting one 50-item request costs ~17 µs, 1.2-2.2 % of the
    # gateway's CPU per request (loadtests/results/drift.md); half keeps it under 2 %
    # at every rate measured, and an hour of traffic is still thousands of requests.
    drift_sample_rate: float = Field(
        0.5,
        ge=0,
        le=1,
        description="share of model-scored requests whose rows are counted for drift (0 = off)",
    )
    # A day: the demo loads once; a daily batch import that misses a run shows up.
    feature_max_age_s: float = Field(
        86_400.0, gt=0, description="features written longer ago than this are stale (alert)"
    )
    # -- model rollouts (gateway/rollout/; README "Shipping a new model") ----------------
    # Every worker reads the rollout state and flushes its counts this often: the fleet
    # follows a change within 2 s even if a beat fails.
    rollout_poll_s: float = Field(0.5, gt=0, le=1.0)
    rollout_lease_ms: int = Field(3_000, ge=500, description="the decision-maker's lease")
    rollout_min_requests: int = Field(
        200, ge=1, description="candidate requests a canary step needs before it is judged"
    )
    rollout_max_failure_rate: float = Field(0.01, ge=0, le=1)
    rollout_failure_margin: float = Field(
        0.005, ge=0, le=1, description="candidate failure rate allowed over the primary's"
    )
    rollout_latency_ratio: float = Field(1.2, ge=1)
    rollout_latency_slack_ms: float = Field(2.0, ge=0)
    # The candidate's share of the inference stage (30 ms): what is left lets the primary
    # answer a request the candidate failed, instead of the rule-based fallback.
    rollout_candidate_inference_ms: float = Field(20.0, gt=0)
    rollout_shadow_max_inflight: int = Field(
        8, ge=1, description="shadow calls in flight per worker; more are dropped"
    )
    # Embedded mode (no Redis): a rollout set at start, judged by this process alone.
    rollout_mode: Literal["none", "shadow", "canary"] = "none"
    rollout_candidate_version: str = ""
    rollout_steps: str = "5,20,50,100"
    rollout_step_seconds: float = Field(60.0, gt=0)

    # -- embedded default ----------------------------------------------------------------
    embedded_users: int = Field(10_000, ge=1)
    embedded_items: int = Field(5_000, ge=1)
    embedded_seed: int = 7

    log_level: str = Field("INFO")

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        scheme = urlparse(v).scheme
        if scheme not in ("redis", "rediss", "unix"):
            from gateway.redisconn import redact

            raise ValueError(f"must be a redis://, rediss:// or unix:// URL, got {redact(v)!r}")
        return v

    @field_validator("triton_url")
    @classmethod
    def _triton_url(cls, v: str | None) -> str | None:
        if v in (None, ""):
            return None
        if v.startswith("http://"):
            from gateway.inference.triton_http import parse_http_url

            parse_http_url(v)  # raises ValueError with the reason
            return v
        grpc = v.removeprefix("grpc://")
        if "://" in grpc and not grpc.startswith(("dns:", "ipv4:", "ipv6:")):
            raise ValueError(
                "must be http://host:port[,host:port] (HTTP) or host:port, grpc://host:port, "
                f"dns:///name:port (gRPC), got {v!r}"
            )
        if ":" not in grpc:
            raise ValueError(f"must name a port (http://host:8000 or host:8001), got {v!r}")
        return v

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        v = v.upper()
        if v not in ("DEBUG", "INFO", "WARNING", "ERROR"):
            raise ValueError("must be one of DEBUG, INFO, WARNING, ERROR")
        return v

    @model_validator(mode="after")
    def _backoff(self) -> Settings:
        if self.retry_backoff_max_ms < self.retry_backoff_base_ms:
            raise ValueError(
                "GATEWAY_RETRY_BACKOFF_MAX_MS must be >= GATEWAY_RETRY_BACKOFF_BASE_MS"
            )
        return self

    @model_validator(mode="after")
    def _rollout(self) -> Settings:
        if self.rollout_mode != "none":
            from gateway.rollout.state import parse_steps

            if not self.rollout_candidate_version.isdigit():
                raise ValueError(
                    "GATEWAY_ROLLOUT_MODE needs GATEWAY_ROLLOUT_CANDIDATE_VERSION (a number)"
                )
            parse_steps(self.rollout_steps)  # raises ValueError with the reason
        return self

    @model_validator(mode="after")
    def _feast(self) -> Settings:
        if self.feature_source == "feast" and self.feast_repo is None:
            raise ValueError("GATEWAY_FEATURE_SOURCE=feast needs GATEWAY_FEAST_REPO")
        return self

    @model_validator(mode="after")
    def _redis_tls(self) -> Settings:
        from gateway.redisconn import RedisTLS

        try:
            RedisTLS.from_settings(self).check(self.redis_url)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @property
    def embedded(self) -> bool:
        return self.redis_url is None and self.triton_url is None and self.feature_source != "feast"


# Settings that existed once: a deployment that still sets one is told what replaced it.
_RENAMED = {
    "GATEWAY_BREAKER_FAIL_MAX": "GATEWAY_BREAKER_FAILURE_RATE and GATEWAY_BREAKER_MIN_CALLS",
    "GATEWAY_BREAKER_SUCCESS_THRESHOLD": "GATEWAY_BREAKER_HALF_OPEN_PROBES",
}


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """One line per ``GATEWAY_*`` variable that is not a setting (a typo, a removed one)."""
    known = {f"GATEWAY_{name.upper()}" for name in Settings.model_fields}
    lines = []
    for var in sorted(environ):
        if var.startswith("GATEWAY_") and var not in known:
            hint = f": replaced by {_RENAMED[var]}" if var in _RENAMED else ""
            lines.append(f"{var} is not a setting and is ignored{hint}")
    return lines


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment (and overrides); one clear line per bad value.

    ``GATEWAY_*`` variables that are not settings are logged as warnings, not errors, so
    a rollback to an older image with newer variables still starts.
    """
    for line in unknown_variables(os.environ):
        logging.getLogger("gateway").warning("%s", line)
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = ".".join(str(p) for p in err["loc"])
            name = f"GATEWAY_{field.upper()}" if field else "settings"
            lines.append(f"{name}: {err['msg']}")
        raise ConfigError("invalid configuration: " + "; ".join(lines)) from None
