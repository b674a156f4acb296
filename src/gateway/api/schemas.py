"""Request and response bodies (pydantic), and request parsing."""

from __future__ import annotations

import itertools
import math
import secrets
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    create_model,
    field_validator,
)

from gateway.errors import InvalidRequest
from gateway.pipeline import PredictInput
from gateway.schema import DEVICES

Id = Annotated[str, StringConstraints(min_length=1, max_length=128)]
Device = Literal[DEVICES]  # type: ignore[valid-type]


class Context(BaseModel):
    """Request-time features the schema declares; any other key is a 422."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    hour: int | None = Field(None, ge=0, le=23, description="hour of day, 0-23")
    device: Device | None = Field(None, description="one of " + ", ".join(DEVICES))

    @field_validator("hour", mode="before")
    @classmethod
    def _hour_is_a_number(cls, v: Any) -> Any:
        # JSON Schema's "integer" includes 16.0 (schemathesis sends it, and so may any
        # client that writes numbers as floats), so lax int parsing; but not "16" or
        # true, which lax mode would also take.
        if isinstance(v, str | bool):
            raise ValueError("must be an integer number, not a string or boolean")
        return v


class PredictRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: Id
    item_ids: list[Id]
    context: Context | None = None
    request_id: Id | None = None


@lru_cache(maxsize=8)
def request_model(max_items: int) -> type[PredictRequestBase]:
    """The request body model with the configured item cap (in the OpenAPI schema too)."""
    return create_model(
        "PredictRequest",
        __base__=PredictRequestBase,
        item_ids=(Annotated[list[Id], Field(min_length=1, max_length=max_items)], ...),
    )


class ScoredItem(BaseModel):
    item_id: str
    score: float


class ModelInfo(BaseModel):
    name: str
    version: str


class Fallback(BaseModel):
    reason: Literal["timeout", "circuit_open", "inference_error", "features_unavailable"]
    stage: Literal["features", "inference"]


class Missing(BaseModel):
    user: bool
    items: int


class Timings(BaseModel):
    features: float
    inference: float
    postprocess: float
    total: float


class PredictResponse(BaseModel):
    request_id: str
    model: ModelInfo
    variant: Literal["primary", "candidate"] = Field(
        description="the rollout arm that answered (primary unless a canary's candidate did)"
    )
    scores: list[ScoredItem]
    fallback: Fallback | None
    missing: Missing
    timings_ms: Timings


class Decision(BaseModel):
    at: float = Field(description="epoch seconds")
    action: Literal["start", "advance", "promote", "rollback", "abort"]
    reason: str


class Serving(BaseModel):
    primary: str
    candidate: str | None
    shadow: bool
    decision_maker: bool


class RolloutView(BaseModel):
    """``GET /rollout``: the rollout this worker follows (state in Redis)."""

    model: str
    mode: Literal["none", "shadow", "canary"]
    state: Literal["idle", "running", "rolled_back", "promoted"]
    primary: ModelInfo | None
    candidate: ModelInfo | None
    weight: float = Field(description="percent of users on the candidate")
    steps: list[float]
    step: int = Field(description="1-based step of the canary; 0 without steps")
    step_seconds: float
    step_started_at: float | None
    last_decision: Decision | None
    rev: int
    serving: Serving


class ErrorDetail(BaseModel):
    field: str
    message: str


class ErrorResponse(BaseModel):
    error: str
    message: str
    detail: list[ErrorDetail] = []


def _loc(err: Any) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or "body"


# Request ids: a random 64-bit prefix per process and a counter, 32 hex digits like a
# UUID. uuid4() reads os.urandom per call: 4.5 % of the CPU of a request in a profile.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count()


def new_request_id() -> str:
    """A request id unique across processes (random prefix) and within one (counter)."""
    return f"{_ID_PREFIX}{next(_ID_COUNTER) & 0xFFFF_FFFF_FFFF_FFFF:016x}"


def parse_predict(body: bytes, max_items: int) -> PredictInput:
    """Validate a JSON body; raise InvalidRequest naming each bad field and why."""
    model = request_model(max_items)
    try:
        req = model.model_validate_json(body)
    except ValidationError as exc:
        detail = []
        for err in exc.errors(include_url=False):
            if err["type"] == "json_invalid":
                detail.append({"field": "body", "message": f"invalid JSON: {err['msg']}"})
            else:
                detail.append({"field": _loc(err), "message": err["msg"]})
        first = detail[0]
        raise InvalidRequest(
            f"{first['field']}: {first['message']}"
            + (f" (and {len(detail) - 1} more)" if len(detail) > 1 else ""),
            detail,
        ) from None
    ctx = None
    if req.context is not None:
        ctx = {
            k: v
            for k, v in (("hour", req.context.hour), ("device", req.context.device))
            if v is not None
        }
    return PredictInput(
        request_id=req.request_id or new_request_id(),
        user_id=req.user_id,
        item_ids=req.item_ids,
        context=ctx,
    )


def parse_timeout_header(value: str | None) -> float | None:
    """``X-Request-Timeout-Ms``: a positive finite number of milliseconds, or absent."""
    if value is None:
        return None
    try:
        ms = float(value.strip())
    except ValueError:
        raise InvalidRequest(
            f"X-Request-Timeout-Ms: {value!r} is not a number of milliseconds",
            [{"field": "header.X-Request-Timeout-Ms", "message": "must be a number"}],
        ) from None
    if not math.isfinite(ms) or ms <= 0:
        raise InvalidRequest(
            f"X-Request-Timeout-Ms: {value!r} must be a positive, finite number of milliseconds",
            [{"field": "header.X-Request-Timeout-Ms", "message": "must be > 0 and finite"}],
        )
    return ms


class DriftResponse(BaseModel):
    """``GET /drift``: PSI of this pod's counted rows against the served version's profile
    (docs/drift.md). A PSI is null while no row was counted."""

    model: ModelInfo
    profile: bool = Field(description="whether the served version has a drift profile")
    window_s: float = Field(description="seconds since this pod began counting this version")
    rows: int = Field(description="rows (item scores) counted")
    features: dict[str, float | None] = Field(description="input column -> PSI")
    score: float | None = Field(description="PSI of the model's scores")
