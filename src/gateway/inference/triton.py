"""Triton over gRPC (tritonclient's asyncio client), created once on the running loop.

The remaining stage budget travels with each request twice: as the gRPC deadline
(``client_timeout``: gRPC cancels the call server-side when it passes) and as
Triton's per-request ``timeout`` in microseconds, which the model's queue policy
honours (``allow_timeout_override``), so Triton drops queued work nobody waits for.

Several Triton replicas: ``GATEWAY_TRITON_URL`` may be ``dns:///triton-headless:8001``
(a headless Service: gRPC resolves every pod address) or ``ipv4:a:p,b:q``; the channel
uses gRPC's own ``round_robin`` load-balancing policy over the resolved addresses,
because one HTTP/2 connection to a ClusterIP would pin all traffic to one pod.

tritonclient's and gRPC's errors become ours in ``_map_error`` only.
"""

from __future__ import annotations

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.errors import InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.schema import SCHEMA

# gRPC keepalive: notice a dead Triton within ~2 s instead of at the next request's
# deadline; 1 s pings are well above Triton's default minimum ping interval policy.
_KEEPALIVE = grpcclient.KeepAliveOptions(
    keepalive_time_ms=1_000, keepalive_timeout_ms=1_000, keepalive_permit_without_calls=True
)
_UNAVAILABLE = ("UNAVAILABLE", "failed to connect", "Connection refused", "Socket closed")


def grpc_target(url: str) -> str:
    """``a:1,b:2`` -> ``ipv4:a:1,b:2`` (gRPC's multi-address form); others unchanged."""
    if "," in url and not url.startswith(("ipv4:", "ipv6:", "dns:")):
        return "ipv4:" + url
    return url


def _map_error(exc: InferenceServerException) -> InferenceError:
    status = str(exc.status() or "")
    msg = str(exc.message() or exc)
    if "DEADLINE_EXCEEDED" in status or "Deadline Exceeded" in msg:
        return InferenceTimeout(f"triton deadline exceeded: {msg}")
    if "timeout" in msg.lower() and "request" in msg.lower():
        # The model's queue policy rejected a request whose timeout expired in the queue.
        return InferenceTimeout(f"triton dropped the request in its queue: {msg}")
    if "UNAVAILABLE" in status or any(s in msg for s in _UNAVAILABLE):
        return InferenceUnavailable(f"triton unavailable: {msg}")
    if "exceeds maximum queue size" in msg:
        return InferenceUnavailable(f"triton queue full: {msg}")
    return InferenceError(f"triton error {status}: {msg}")


class TritonBackend:
    """One channel for the process; one ModelInfer call per /predict."""

    name = "triton"

    def __init__(self, url: str, model_name: str, model_version: str = "") -> None:
        self.url = url
        self.model_name = model_name
        self.model_version = model_version or ""
        self._requested_version = model_version
        self._client: grpcclient.InferenceServerClient | None = None
        # The same requested output every time: built once, not per request.
        self._outputs = [grpcclient.InferRequestedOutput(SCHEMA.output_name)]

    async def start(self) -> None:
        """Create the client on the running loop (a channel made at import would be bound
        to another loop) and learn the served version if Triton is up already."""
        channel_args = [
            ("grpc.lb_policy_name", "round_robin"),
            # Reconnect quickly after a Triton restart (gRPC's default backoff reaches 120 s).
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 1_000),
            ("grpc.keepalive_time_ms", _KEEPALIVE.keepalive_time_ms),
            ("grpc.keepalive_timeout_ms", _KEEPALIVE.keepalive_timeout_ms),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
        ]
        self._client = grpcclient.InferenceServerClient(
            grpc_target(self.url), channel_args=channel_args
        )
        try:
            await self._learn_version()
        except InferenceServerException:
            # Triton may start after us: the health check learns the version later, and
            # the breaker and the fallback handle requests meanwhile.
            pass

    async def _learn_version(self) -> None:
        """The version Triton serves when none was asked for: its newest ready one."""
        if self._requested_version:
            return
        meta = await self._c().get_model_metadata(self.model_name, "", client_timeout=1.0)
        versions = list(meta.versions)
        if versions:
            self.model_version = max(versions, key=lambda v: int(v) if v.isdigit() else -1)

    def _c(self) -> grpcclient.InferenceServerClient:
        if self._client is None:
            raise InferenceUnavailable("triton client not started")
        return self._client

    async def infer(self, matrix: np.ndarray, timeout_s: float) -> np.ndarray:
        inp = grpcclient.InferInput(SCHEMA.input_name, list(matrix.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        try:
            result = await self._c().infer(
                self.model_name,
                [inp],
                model_version=self._requested_version,
                outputs=self._outputs,
                client_timeout=timeout_s,
                # Triton's per-request timeout is in microseconds; at least 1.
                timeout=max(1, int(timeout_s * 1e6)),
            )
        except InferenceServerException as exc:
            raise _map_error(exc) from exc
        try:
            scores = result.as_numpy(SCHEMA.output_name)
        except AttributeError as exc:
            # grpc.aio returns None for a reply it cannot deserialize (it only logs
            # "Exception deserializing message!") and tritonclient wraps that None: a
            # corrupt reply, not a bug of ours (the blackhole fault test met it as a 500).
            raise InferenceError("triton's reply could not be decoded") from exc
        if scores is None or scores.shape[0] != matrix.shape[0]:
            raise InferenceError("triton returned no or the wrong number of scores")
        return np.asarray(scores[:, 0], dtype=np.float32)

    async def ready(self) -> None:
        try:
            ok = await self._c().is_model_ready(
                self.model_name, self._requested_version, client_timeout=0.5
            )
        except InferenceServerException as exc:
            raise _map_error(exc) from exc
        if not ok:
            raise InferenceUnavailable(f"model {self.model_name} is not ready on triton")
        try:
            # Called by the background health check: follows a Triton that started after
            # us or loaded a new version.
            await self._learn_version()
        except InferenceServerException as exc:
            raise _map_error(exc) from exc

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
