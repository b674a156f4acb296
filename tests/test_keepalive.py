"""The gateway's gRPC keepalive stays inside what a Triton with default flags accepts.

Light traffic with two 15 s idle gaps against the local Triton (started with no
``--grpc-keepalive-*`` / ``--grpc-http2-*`` flags, i.e. gRPC's server defaults). A
client that pings an idle connection every second collects three ping strikes within
~4 s of each gap and Triton answers GOAWAY ENHANCE_YOUR_CALM "too_many_pings", which
gRPC core logs on the gateway's stderr (its log here): the old settings logged it 3
times in this run. After each gap the model must still answer.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import httpx

from tests.procs import GatewayServer, RedisServer, TritonServer

# gRPC core writes its log through absl to stderr; GRPC_VERBOSITY=NONE would hide the
# GOAWAY line and an unset one leaves it to the environment, so the test pins ERROR (the
# GOAWAY line is an error-level one).
GRPC_LOG_ENV = {"GRPC_VERBOSITY": "ERROR"}
# Three ping strikes at 1 s intervals trip a default Triton ~4 s into a gap; 15 s is the
# gap of the reported run and leaves room for the doubled keepalive gRPC applies after a
# GOAWAY.
IDLE_S = 15.0


def _predict(client: httpx.Client, gw: GatewayServer) -> dict:
    r = client.post(
        f"{gw.url}/predict",
        json={"user_id": "u1", "item_ids": ["i1", "i2", "i3"], "context": {"hour": 9}},
    )
    assert r.status_code == 200, r.text
    return r.json()


def test_no_goaway_over_idle_gaps(
    redis_server: RedisServer,
    triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    gw = gateway_factory(
        {
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "INFO",
            **GRPC_LOG_ENV,
        },
        ready=True,
    )
    with httpx.Client(timeout=5) as client:
        for gap in range(3):
            # Light traffic: two requests a second for ~2 s; the first ones after a gap
            # must be the model's answers, not the fallback's.
            first = [_predict(client, gw) for _ in range(3)]
            assert [a["fallback"] for a in first] == [None] * 3, (gap, first)
            for _ in range(4):
                _predict(client, gw)
                time.sleep(0.5)
            if gap < 2:
                time.sleep(IDLE_S)
    assert gw.log_path is not None
    log = gw.log_path.read_text(errors="replace")
    bad = [line for line in log.splitlines() if "GOAWAY" in line or "too_many_pings" in line]
    assert not bad, "\n".join(bad[:5])
    assert "gateway started" in log, log[-2000:]  # the log is the gateway's, and complete
