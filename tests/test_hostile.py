"""Hostile input against the gateway process over real Redis and the local Triton.

* schemathesis generates requests from the gateway's own /openapi.json (valid and
  invalid ones): never a 5xx, and every response conforms to the schema.
* Explicit cases the generator is unlikely to hit: a huge body, deeply nested JSON,
  unicode, NUL and lone surrogates in ids, 10,000 items, duplicate ids, negative and
  NaN timeout headers. Each gets its documented status, every 4xx a readable message,
  and the gateway keeps serving afterwards.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.generation.modes import GenerationMode

from tests.procs import GatewayServer

BUDGET_S = 0.050


@pytest.fixture(scope="module")
def hostile_gateway(
    redis_server, triton, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayServer]:
    log: Path = tmp_path_factory.mktemp("hostile") / "gateway.log"
    gw = GatewayServer(
        env={
            "GATEWAY_REDIS_URL": redis_server.url,
            "GATEWAY_TRITON_URL": triton.grpc_url,
            "GATEWAY_LOG_LEVEL": "ERROR",
        },
        log_path=log,
    ).start(ready=True)
    yield gw
    gw.stop()


@pytest.fixture(scope="module")
def api_schema(hostile_gateway: GatewayServer):
    with urllib.request.urlopen(f"{hostile_gateway.url}/openapi.json", timeout=5) as r:
        raw = json.load(r)
    return schemathesis.openapi.from_dict(raw)


# Driven through hypothesis directly: schemathesis 4.32's pytest integration
# (``from_fixture``/``parametrize``) sets ``node._nodeid``, which pytest 9 no longer has.
@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_openapi_conformance(api_schema, hostile_gateway: GatewayServer, mode) -> None:
    """No 5xx; status codes, content types, headers and bodies as the schema says."""
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert any(op.path == "/predict" for op in operations)
    if mode == GenerationMode.NEGATIVE:  # only /predict takes input to get wrong
        operations = [op for op in operations if op.path == "/predict"]
    for op in operations:

        @given(case=op.as_strategy(generation_mode=mode))
        @settings(
            max_examples=40 if op.path == "/predict" else 5,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,  # the same cases every run: a CI failure reproduces
            database=None,
        )
        def check(case) -> None:
            response = case.call_and_validate(base_url=hostile_gateway.url, timeout=10)
            assert response.status_code < 500, response.text

        check()


def post(
    gw: GatewayServer,
    body: bytes,
    headers: dict[str, str] | None = None,
    content_type: str = "application/json",
) -> tuple[int, dict, dict[str, str]]:
    req = urllib.request.Request(
        f"{gw.url}/predict",
        data=body,
        headers={"Content-Type": content_type, **(headers or {})},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, orjson.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as exc:
        data = exc.read()
        return exc.code, orjson.loads(data), dict(exc.headers)


def assert_readable_4xx(status: int, doc: dict, expected: int) -> None:
    assert status == expected, (status, doc)
    assert isinstance(doc.get("message"), str) and len(doc["message"]) >= 10, doc
    assert doc.get("error"), doc


def ok_body(**over) -> bytes:
    doc = {"user_id": "u1", "item_ids": ["i1", "i2", "i3"], **over}
    return orjson.dumps(doc)


def test_huge_body(hostile_gateway) -> None:
    """5 MB declared: refused from the header, before a byte of it is read (the client
    then sees the 413 without having to send the body; one that insists gets a reset)."""
    conn = http.client.HTTPConnection("127.0.0.1", hostile_gateway.port, timeout=10)
    try:
        conn.putrequest("POST", "/predict")
        conn.putheader("Content-Type", "application/json")
        conn.putheader("Content-Length", str(5_000_000))
        conn.endheaders()
        conn.send(b'{"user_id": "u1", "item_ids": ["')
        resp = conn.getresponse()
        doc = orjson.loads(resp.read())
    finally:
        conn.close()
    assert_readable_4xx(resp.status, doc, 413)
    assert "limit" in doc["message"]


def test_huge_body_without_content_length(hostile_gateway) -> None:
    """Chunked: the limit is enforced while reading, not from a header."""

    def chunks() -> Iterator[bytes]:
        yield b'{"user_id": "u1", "item_ids": ["'
        for _ in range(100):
            yield b"i" * 10_000
        yield b'"]}'

    req = urllib.request.Request(
        f"{hostile_gateway.url}/predict",
        data=chunks(),
        headers={"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=10)
    assert err.value.code == 413
    assert "limit" in orjson.loads(err.value.read())["message"]


@pytest.mark.parametrize("depth", [50, 5_000, 100_000])
def test_deeply_nested_json(hostile_gateway, depth: int) -> None:
    nested = "[" * depth + "]" * depth
    body = f'{{"user_id": "u1", "item_ids": ["i1"], "context": {nested}}}'.encode()
    status, doc, _ = post(hostile_gateway, body)
    assert_readable_4xx(status, doc, 422)


@pytest.mark.parametrize(
    "user_id",
    [
        "u\x00",
        "\x00",
        "用户一",
        "👩\u200d👩\u200d👧",
        "u1\x00\x00injected",
        "\u202eu1",
        "u1\r\nSET x y",
    ],
)
def test_unicode_and_nul_ids_are_served(hostile_gateway, user_id: str) -> None:
    """Odd but valid strings are ids like any other: unknown, served on defaults."""
    status, doc, _ = post(hostile_gateway, ok_body(user_id=user_id, item_ids=["i1", "i\x00"]))
    assert status == 200, doc
    assert doc["missing"]["user"] is True
    assert [s["item_id"] for s in doc["scores"]] == ["i1", "i\x00"]


def test_lone_surrogate_in_id(hostile_gateway) -> None:
    """JSON may escape a lone surrogate, which no UTF-8 encoder (nor Redis key) takes."""
    body = b'{"user_id": "u\\ud800", "item_ids": ["i1"]}'
    status, doc, _ = post(hostile_gateway, body)
    assert status in (200, 422), doc
    if status == 422:
        assert_readable_4xx(status, doc, 422)


def test_ten_thousand_items(hostile_gateway) -> None:
    ids = [f"i{k}" for k in range(10_000)]
    status, doc, _ = post(hostile_gateway, orjson.dumps({"user_id": "u1", "item_ids": ids}))
    assert status in (413, 422), doc
    assert_readable_4xx(status, doc, status)


def test_duplicate_item_ids(hostile_gateway) -> None:
    ids = ["i5", "i5", "i7", "i5"]
    status, doc, _ = post(hostile_gateway, ok_body(item_ids=ids))
    assert status == 200, doc
    assert [s["item_id"] for s in doc["scores"]] == ids
    scores = [s["score"] for s in doc["scores"]]
    assert scores[0] == scores[1] == scores[3]


@pytest.mark.parametrize("value", ["-5", "NaN", "nan", "inf", "-inf", "0", "", "1e999", "five"])
def test_bad_timeout_header(hostile_gateway, value: str) -> None:
    status, doc, _ = post(hostile_gateway, ok_body(), headers={"X-Request-Timeout-Ms": value})
    assert_readable_4xx(status, doc, 422)
    assert "X-Request-Timeout-Ms" in doc["message"]


@pytest.mark.parametrize(
    ("body", "ctype", "expected"),
    [
        (b"not json", "application/json", 422),
        (b"", "application/json", 422),
        (b"[]", "application/json", 422),
        (b'{"user_id": 5, "item_ids": ["i1"]}', "application/json", 422),
        (b'{"user_id": "u1", "item_ids": []}', "application/json", 422),
        (b'{"user_id": "u1", "item_ids": ["i1"], "context": {"evil": 1}}', "application/json", 422),
        (b'{"user_id": "u1", "item_ids": ["i1"]}', "text/plain", 415),
        (b"\xff\xfe\x00garbage", "application/json", 422),
    ],
)
def test_bad_requests_get_readable_4xx(hostile_gateway, body, ctype, expected) -> None:
    status, doc, _ = post(hostile_gateway, body, content_type=ctype)
    assert_readable_4xx(status, doc, expected)


def test_still_serving_after_all_that(hostile_gateway) -> None:
    status, doc, _ = post(hostile_gateway, ok_body())
    assert status == 200 and doc["fallback"] is None, doc
    assert doc["timings_ms"]["total"] <= BUDGET_S * 1e3
