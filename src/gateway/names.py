"""Names shared by the pipeline, metrics, the API and the docs, as types.

A ``StrEnum`` member is its string value, so it serialises, labels and compares as the
plain string the API documents (``"timeout"``), while a typo in the code is an error.
"""

from __future__ import annotations

from enum import StrEnum


class Stage(StrEnum):
    """A pipeline stage (``gateway_stage_duration_seconds{stage}``, ``fallback.stage``)."""

    FEATURES = "features"
    INFERENCE = "inference"
    POSTPROCESS = "postprocess"


class FallbackReason(StrEnum):
    """Why the rule-based fallback answered (``fallback.reason``)."""

    TIMEOUT = "timeout"
    CIRCUIT_OPEN = "circuit_open"
    INFERENCE_ERROR = "inference_error"
    FEATURES_UNAVAILABLE = "features_unavailable"


class Outcome(StrEnum):
    """How a /predict ended (``gateway_request_duration_seconds{outcome}``)."""

    MODEL = "model"
    FALLBACK = "fallback"
    SHED = "shed"
    CLIENT_ERROR = "client_error"
    ERROR = "error"
    DISCONNECTED = "disconnected"
