"""Client-side balancing over several Triton replicas (issue 4, Kubernetes section).

Behind a ClusterIP Service gRPC keeps one HTTP/2 connection to one pod, so every
request lands on one Triton replica. The gateway instead balances itself over every
address: over gRPC with the ``round_robin`` policy (``GATEWAY_TRITON_URL=a:p,b:q`` here;
``dns:///`` a headless Service in the cluster), over HTTP round robin per request over
its keep-alive pools (``http://a:p,b:q``; a headless Service's name resolves to every
pod). These tests run two real local Tritons, with each protocol, and read each one's
own ``nv_inference_request_success`` counter.
"""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Callable, Iterator

import httpx
import pytest

from tests.procs import GatewayServer, TritonServer
from tests.protocols import PROTOCOLS, as_url, endpoint

MODEL = "ctr"
# Enough requests that a strict alternation and a lopsided split are far apart.
N_REQUESTS = 200


def successes(triton: TritonServer, model: str = MODEL) -> float:
    """Triton's own count of successful inference requests for ``model``."""
    with urllib.request.urlopen(triton.metrics_url, timeout=5) as r:
        text = r.read().decode()
    total = 0.0
    for m in re.finditer(r"^nv_inference_request_success\{([^}]*)\} (\S+)$", text, re.M):
        if f'model="{model}"' in m.group(1):
            total += float(m.group(2))
    return total


@pytest.fixture
def second_triton(tmp_path) -> Iterator[TritonServer]:
    server = TritonServer(log_path=tmp_path / "triton-2.log").start()
    yield server
    server.stop()


def predict(client: httpx.Client, i: int) -> dict:
    r = client.post(
        "/predict",
        json={"user_id": f"u{i % 1000}", "item_ids": [f"i{(i + k) % 5000}" for k in range(20)]},
    )
    assert r.status_code == 200, r.text
    return r.json()


def both(a: TritonServer, b: TritonServer, protocol: str) -> str:
    return as_url(f"{endpoint(a, protocol)},{endpoint(b, protocol)}", protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_requests_spread_over_both_tritons(
    protocol: str,
    triton: TritonServer,
    second_triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    """Each /predict is one Triton request, and round robin sends about half to each."""
    gw = gateway_factory(
        env={"GATEWAY_TRITON_URL": both(triton, second_triton, protocol)}, ready=True
    )
    before = successes(triton), successes(second_triton)
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        answers = [predict(client, i) for i in range(N_REQUESTS)]
    assert [a["fallback"] for a in answers] == [None] * N_REQUESTS
    d1, d2 = successes(triton) - before[0], successes(second_triton) - before[1]
    assert d1 + d2 == N_REQUESTS, (d1, d2)
    # Both alternate over live addresses (gRPC: READY subchannels): each gets about half.
    assert min(d1, d2) >= 0.4 * N_REQUESTS, f"lopsided split: {d1:.0f} vs {d2:.0f}"


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_one_triton_stopped_the_other_takes_all(
    protocol: str,
    triton: TritonServer,
    second_triton: TritonServer,
    gateway_factory: Callable[..., GatewayServer],
) -> None:
    """With one replica gone, gRPC drops its subchannel, HTTP marks its address down (a
    background probe reconnects later), and the model still answers."""
    gw = gateway_factory(
        env={"GATEWAY_TRITON_URL": both(triton, second_triton, protocol)}, ready=True
    )
    with httpx.Client(base_url=gw.url, timeout=5) as client:
        for i in range(20):
            predict(client, i)
        second_triton.stop()
        # A request in flight when it went may fall back; after that, none may.
        first = [predict(client, i) for i in range(10)]
        before = successes(triton)
        answers = [predict(client, i) for i in range(100)]
    assert sum(a["fallback"] is not None for a in first) <= 2, first
    assert [a["fallback"] for a in answers] == [None] * 100
    assert successes(triton) - before == 100
