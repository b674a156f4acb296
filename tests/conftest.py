"""Shared fixtures: real redis-server, the local Triton, and gateway processes."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from gateway.features.loader import load
from tests import loadgen
from tests.faultproxy import ProxyProcess
from tests.procs import GatewayServer, RedisServer, TritonServer


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    """Resilience rows (tests/loadgen.py ``record``) are written only for a passed test."""
    report = yield
    if report.when == "call":
        loadgen.settle(passed=report.passed)
    return report


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A session-wide redis-server with the default generated features loaded."""
    server = RedisServer().start()
    load(server.url, progress=False)
    yield server
    server.stop()


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """An empty redis-server of the test's own (for tests that pause, kill or corrupt it)."""
    server = RedisServer().start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def triton(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonServer]:
    """A session-wide local Triton over the committed model repository."""
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    server = TritonServer(log_path=log).start()
    yield server
    server.stop()


@pytest.fixture
def gateway_factory(tmp_path) -> Iterator[Callable[..., GatewayServer]]:
    """Start ``gateway serve`` processes with a given environment; all stopped at teardown."""
    started: list[GatewayServer] = []

    def start(
        env: dict[str, str] | None = None, workers: int = 1, ready: bool = False
    ) -> GatewayServer:
        gw = GatewayServer(
            env=dict(env or {}), workers=workers, log_path=tmp_path / f"gateway-{len(started)}.log"
        )
        started.append(gw)
        return gw.start(ready=ready)

    yield start
    for gw in started:
        gw.stop()


# -- resilience tests (issue 6): fault proxies, Triton instances a test may kill -----------


@pytest.fixture
def triton_factory(tmp_path) -> Iterator[Callable[..., TritonServer]]:
    """Start Triton instances of the test's own (any repository); all stopped at teardown."""
    started: list[TritonServer] = []

    def start(repo=None) -> TritonServer:
        kw = {"repo": repo} if repo is not None else {}
        server = TritonServer(log_path=tmp_path / f"triton-{len(started)}.log", **kw)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


@pytest.fixture
def proxy_factory(tmp_path) -> Iterator[Callable[[str], ProxyProcess]]:
    """Start fault proxies in front of ``host:port`` upstreams; all stopped at teardown."""
    started: list[ProxyProcess] = []

    def start(upstream: str) -> ProxyProcess:
        proxy = ProxyProcess(upstream, log_path=tmp_path / f"proxy-{len(started)}.log")
        started.append(proxy)
        return proxy.start()

    yield start
    for proxy in started:
        proxy.stop()
