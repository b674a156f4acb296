"""GATEWAY_TRITON_URL picks the transport; bad values get one clear line."""

import pytest

from gateway.config import load_settings
from gateway.errors import ConfigError
from gateway.inference.triton import TritonBackend
from gateway.inference.triton_http import TritonHTTPBackend, parse_http_url
from gateway.runtime import build_backend


@pytest.mark.parametrize(
    ("url", "targets"),
    [
        ("http://triton:8000", [("triton", 8000)]),
        ("http://a:8000,b:8001/", [("a", 8000), ("b", 8001)]),
        ("http://10.0.0.1:8000, 10.0.0.2:8000", [("10.0.0.1", 8000), ("10.0.0.2", 8000)]),
        ("http://[::1]:8000", [("::1", 8000)]),
    ],
)
def test_http_urls_parse(url: str, targets: list[tuple[str, int]]) -> None:
    assert parse_http_url(url) == targets


@pytest.mark.parametrize(
    ("url", "kind"),
    [
        ("http://triton:8000", TritonHTTPBackend),
        ("http://a:8000,b:8000", TritonHTTPBackend),
        ("triton:8001", TritonBackend),
        ("grpc://triton:8001", TritonBackend),
        ("a:8001,b:8001", TritonBackend),
        ("dns:///triton-headless:8001", TritonBackend),
        ("ipv4:10.0.0.1:8001,10.0.0.2:8001", TritonBackend),
    ],
)
def test_the_url_selects_the_backend(monkeypatch: pytest.MonkeyPatch, url: str, kind: type) -> None:
    monkeypatch.setenv("GATEWAY_TRITON_URL", url)
    backend = build_backend(load_settings())
    assert type(backend) is kind
    if kind is TritonBackend:
        assert not backend.url.startswith("grpc://")  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("http://triton", "host:port"),
        ("http://triton:port", "host:port"),
        ("http://triton:8000/v2", "no path"),
        ("http://user@triton:8000", "no path"),
        ("http://a:8000,,b:8000", "host:port"),
        ("https://triton:8000", "http://host:port"),
        ("triton", "port"),
        ("grpc://triton", "port"),
    ],
)
def test_bad_triton_urls_get_one_line(
    monkeypatch: pytest.MonkeyPatch, url: str, words: str
) -> None:
    monkeypatch.setenv("GATEWAY_TRITON_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    assert "GATEWAY_TRITON_URL" in msg and words in msg and "\n" not in msg, msg
