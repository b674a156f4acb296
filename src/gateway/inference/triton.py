"""Triton over gRPC (tritonclient's asyncio client), created once on the running loop.

The remaining stage budget travels with each request as the gRPC deadline
(``client_timeout``): when it passes, gRPC cancels the call server-side and Triton drops
the request when its batcher reaches it, so Triton does not work for a caller that gave
up. It also travels as Triton's per-request ``timeout`` (microseconds), which Triton
applies only under a queue policy that allows overrides; the shipped config has no queue
policy (``model_repository/ctr/config.pbtxt`` says why: bursts).

Several Triton replicas: ``GATEWAY_TRITON_URL`` may be ``dns:///triton-headless:8001``
(a headless Service: gRPC resolves every pod address) or ``ipv4:a:p,b:q``; the channel
uses gRPC's own ``round_robin`` load-balancing policy over the resolved addresses,
because one HTTP/2 connection to a ClusterIP would pin all traffic to one pod.

tritonclient's and gRPC's errors become ours in ``_map_error`` only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from gateway.errors import InferenceError, InferenceTimeout, InferenceUnavailable
from gateway.inference.base import ModelSignature, TensorSpec
from gateway.schema import SCHEMA, FeatureSchema

# gRPC keepalive inside what a Triton with default flags accepts. Triton's gRPC server keeps
# gRPC's defaults (server grpc_server.h KeepAliveOptions; docs inference_protocols.md):
# --grpc-keepalive-permit-without-calls 0, --grpc-http2-min-recv-ping-interval-without-data
# 300000 ms, --grpc-http2-max-ping-strikes 2. It counts a ping as a strike when it comes less
# than 5 minutes after the previous one with nothing sent by the server in between (2 hours
# when no call is open), and answers the third strike with GOAWAY ENHANCE_YOUR_CALM
# "too_many_pings", closing the connection. The old settings pinged every 1 s even with no
# call open, without limit: 3 GOAWAYs in 40 s of light traffic with 15 s idle gaps
# (tests/test_keepalive.py). So, client side only, because a managed Triton may not take our
# server flags:
# - no ping while no call is open (permit_without_calls off): an idle channel is silent;
# - while a call is open, a ping once 1 s has passed with nothing received, and the
#   connection is dropped when its ack takes over 1 s: a dead Triton under traffic is
#   noticed within ~2 s. A live Triton's answers reset both that 1 s and its strike count,
#   so it never sees three strikes; a hung one (no answers) gets GOAWAY'd, which is right;
# - at most 2 pings until we send data again (gRPC's default; the old 0 meant no limit).
# What an idle channel gives up is covered elsewhere: the next calls fail at their deadline
# (30 ms), the breaker opens after GATEWAY_BREAKER_FAIL_MAX of them, and the keepalive runs
# again during those calls and during /readyz checks (which wait up to 0.5 s).
_KEEPALIVE = grpcclient.KeepAliveOptions(
    keepalive_time_ms=1_000,
    keepalive_timeout_ms=1_000,
    keepalive_permit_without_calls=False,
    http2_max_pings_without_data=2,
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

    def __init__(
        self, url: str, model_name: str, model_version: str = "", schema: FeatureSchema = SCHEMA
    ) -> None:
        self.url = url
        self._input_name, self._output_name = schema.input_name, schema.output_name
        self.model_name = model_name
        self.model_version = model_version or ""
        self._requested_version = model_version
        self._client: grpcclient.InferenceServerClient | None = None
        # The same requested output every time: built once, not per request.
        self._outputs = [grpcclient.InferRequestedOutput(self._output_name)]

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
            (
                "grpc.keepalive_permit_without_calls",
                int(_KEEPALIVE.keepalive_permit_without_calls),
            ),
            ("grpc.http2.max_pings_without_data", _KEEPALIVE.http2_max_pings_without_data),
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

    async def infer(
        self, matrix: np.ndarray, timeout_s: float, version: str | None = None
    ) -> np.ndarray:
        inp = grpcclient.InferInput(self._input_name, list(matrix.shape), "FP32")
        inp.set_data_from_numpy(np.ascontiguousarray(matrix, dtype=np.float32))
        try:
            result = await self._c().infer(
                self.model_name,
                [inp],
                model_version=version or self._requested_version,
                outputs=self._outputs,
                client_timeout=timeout_s,
                # Triton's per-request timeout is in microseconds; at least 1.
                timeout=max(1, int(timeout_s * 1e6)),
            )
        except InferenceServerException as exc:
            raise _map_error(exc) from exc
        try:
            scores = result.as_numpy(self._output_name)
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

    async def load_version(self, version: str) -> None:
        """Triton serves every version its ``version_policy`` names: check it is ready."""
        try:
            ok = await self._c().is_model_ready(self.model_name, version, client_timeout=1.0)
        except InferenceServerException as exc:
            raise _map_error(exc) from exc
        if not ok:
            raise InferenceUnavailable(f"model {self.model_name} version {version} is not ready")

    async def signature(self) -> ModelSignature:
        """The model's inputs and outputs from Triton's model metadata (KServe v2)."""
        try:
            meta = await self._c().get_model_metadata(
                self.model_name, self._requested_version, client_timeout=1.0
            )
        except InferenceServerException as exc:
            raise _map_error(exc) from exc

        def spec(t: Any) -> TensorSpec:
            return TensorSpec(t.name, t.datatype, tuple(int(d) for d in t.shape))

        return ModelSignature(
            tuple(spec(t) for t in meta.inputs), tuple(spec(t) for t in meta.outputs)
        )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.close()
