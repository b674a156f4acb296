"""Which Triton endpoint a test's gateway talks to.

HTTP (``http://host:port``, ``inference/triton_http.py``) is the default for new
deployments; gRPC (``host:port``, ``inference/triton.py``) stays supported. Tests that
are about Triton run with both (``@pytest.mark.parametrize("protocol", PROTOCOLS)``);
the others use HTTP.
"""

from __future__ import annotations

from tests.procs import TritonServer

PROTOCOLS = ("http", "grpc")


def endpoint(server: TritonServer, protocol: str = "http") -> str:
    """``host:port`` of the server's endpoint for ``protocol`` (what a proxy forwards to)."""
    return server.http_url if protocol == "http" else server.grpc_url


def as_url(address: str, protocol: str = "http") -> str:
    """``GATEWAY_TRITON_URL`` for ``host:port`` (or a comma list) of that protocol."""
    return f"http://{address}" if protocol == "http" else address


def triton_url(server: TritonServer, protocol: str = "http") -> str:
    """``GATEWAY_TRITON_URL`` for a local Triton over ``protocol``."""
    return as_url(endpoint(server, protocol), protocol)


def scenario(name: str, protocol: str) -> str:
    """A resilience row's name: gRPC rows are marked, HTTP (the default) rows are not."""
    return name if protocol == "http" else f"{name} (gRPC)"
