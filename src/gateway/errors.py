"""The gateway's errors. Every error the project raises on purpose is one of these.

::

    GatewayError
    ├── ConfigError                 bad settings, flags or files; the CLI prints one line
    │   ├── ModelRepositoryError    missing model file, malformed config.pbtxt
    │   └── PortInUse
    ├── RequestError                a bad request (4xx); never reaches Redis or Triton
    │   ├── MethodNotAllowed        405
    │   ├── InvalidRequest          422
    │   ├── RequestTimeout          408: the body did not arrive in time
    │   ├── PayloadTooLarge         413
    │   ├── UnsupportedMediaType    415
    │   └── ClientDisconnected      the client left while sending; nobody gets an answer
    ├── DependencyError             a downstream failure; the fallback answers instead
    │   ├── FeatureStoreError       Redis failed or returned something unusable
    │   │   ├── FeatureStoreTimeout
    │   │   ├── FeatureStoreUnavailable   connection refused/reset (transient)
    │   │   ├── FeatureStoreRefused  credentials, an ACL permission or TLS trust refused
    │   │   └── SchemaMismatch      the store holds another feature schema version
    │   ├── InferenceError          Triton or onnxruntime failed
    │   │   ├── InferenceTimeout
    │   │   └── InferenceUnavailable      Triton UNAVAILABLE / unreachable (transient)
    │   ├── CircuitOpen             the dependency's breaker is open; nothing was sent
    │   └── StageSkipped            too little of the budget left to try; nothing was sent
    └── Overloaded                  admission control shed the request (503)

Library errors become ours in one place per dependency (``features/redis_store.py``,
``inference/triton.py``), always with ``raise ... from exc``. HTTP status codes are
assigned only in ``api/errors.py``.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A setting, flag or file the operator gave is wrong."""


class ModelRepositoryError(ConfigError):
    """The model repository is missing a file or holds a malformed config."""


class PortInUse(ConfigError):
    """A port we were asked to listen on is taken."""


class RequestError(GatewayError):
    """The client sent something we will not process."""

    status_code = 400
    error = "bad_request"
    headers: dict[str, str] = {}  # extra response headers

    def __init__(self, message: str, detail: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail or []


class MethodNotAllowed(RequestError):
    status_code = 405
    error = "method_not_allowed"
    headers = {"Allow": "POST"}


class InvalidRequest(RequestError):
    status_code = 422
    error = "validation_error"


class PayloadTooLarge(RequestError):
    status_code = 413
    error = "payload_too_large"


class UnsupportedMediaType(RequestError):
    status_code = 415
    error = "unsupported_media_type"


class RequestTimeout(RequestError):
    status_code = 408
    error = "request_timeout"


class ClientDisconnected(RequestError):
    """The client closed the connection before its body was complete."""

    # nginx's "client closed request": never seen by the client, only in our accounting.
    status_code = 499
    error = "client_closed_request"


class DependencyError(GatewayError):
    """A downstream dependency failed; ``reason`` is the fallback reason it maps to.

    ``transient``: worth a retry inside the stage's deadline. ``timeout``: the dependency
    did not answer in the time it was given (whether that counts against its breaker
    depends on how much time that was; see ``pipeline.GuardedCall``).
    """

    reason = "inference_error"
    transient = False
    timeout = False


class FeatureStoreError(DependencyError):
    reason = "features_unavailable"


class FeatureStoreTimeout(FeatureStoreError):
    """Redis did not answer inside the features budget (still ``features_unavailable``)."""

    timeout = True


class FeatureStoreUnavailable(FeatureStoreError):
    """Connection refused or reset: worth one retry if the budget allows."""

    transient = True


class FeatureStoreRefused(FeatureStoreError):
    """Redis refused us: WRONGPASS/NOAUTH, NOPERM (our ACL user lacks a permission) or a
    TLS certificate we do not trust. A configuration error: never retried."""


class SchemaMismatch(FeatureStoreError):
    """The store's version key names another schema than this gateway's."""


class InferenceError(DependencyError):
    reason = "inference_error"


class InferenceTimeout(InferenceError):
    reason = "timeout"
    timeout = True


class InferenceUnavailable(InferenceError):
    """Triton unreachable or UNAVAILABLE: worth one retry if the budget allows."""

    transient = True


class CircuitOpen(DependencyError):
    """The breaker for a dependency is open; the call was not attempted."""

    reason = "circuit_open"


class StageSkipped(DependencyError):
    """Less than the minimum attempt time was left for the stage: not attempted.

    Not a failure of the dependency (it was never asked); the fallback answers with
    reason ``timeout``.
    """

    reason = "timeout"


class Overloaded(GatewayError):
    """Admission control refused the request."""

    def __init__(self, retry_after_s: int = 1) -> None:
        super().__init__("too many requests in flight")
        self.retry_after_s = retry_after_s
