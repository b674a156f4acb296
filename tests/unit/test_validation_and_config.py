import pytest

from gateway.api.schemas import parse_predict, parse_timeout_header
from gateway.config import load_settings
from gateway.errors import ConfigError, InvalidRequest


def _err(body: bytes, max_items: int = 500) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as info:
        parse_predict(body, max_items)
    return info.value


def test_valid_request_parses_and_gets_a_request_id() -> None:
    r = parse_predict(b'{"user_id":"u1","item_ids":["a","b"],"context":{"hour":3}}', 500)
    assert r.user_id == "u1" and r.item_ids == ["a", "b"] and r.context == {"hour": 3}
    assert len(r.request_id) == 32
    r = parse_predict(b'{"user_id":"u1","item_ids":["a"],"request_id":"abc"}', 500)
    assert r.request_id == "abc" and r.context is None


@pytest.mark.parametrize(
    ("body", "field", "words"),
    [
        (b"not json", "body", "invalid JSON"),
        (b'{"user_id":5,"item_ids":["a"]}', "user_id", "string"),
        (b'{"item_ids":["a"]}', "user_id", "required"),
        (b'{"user_id":"u","item_ids":[]}', "item_ids", "at least 1"),
        (b'{"user_id":"u","item_ids":"a"}', "item_ids", "valid array"),
        (b'{"user_id":"' + b"x" * 129 + b'","item_ids":["a"]}', "user_id", "at most 128"),
        (b'{"user_id":"","item_ids":["a"]}', "user_id", "at least 1"),
        (
            b'{"user_id":"u","item_ids":["a"],"context":{"weather":"rain"}}',
            "context.weather",
            "not permitted",
        ),
        (
            b'{"user_id":"u","item_ids":["a"],"context":{"hour":24}}',
            "context.hour",
            "less than or equal",
        ),
        (
            b'{"user_id":"u","item_ids":["a"],"context":{"device":"watch"}}',
            "context.device",
            "mobile",
        ),
        (b'{"user_id":"u","item_ids":["a"],"extra":1}', "extra", "not permitted"),
    ],
)
def test_bad_bodies_name_the_field_and_why(body: bytes, field: str, words: str) -> None:
    e = _err(body)
    assert e.status_code == 422
    assert e.detail[0]["field"] == field, e.detail
    assert words in e.detail[0]["message"], e.detail
    assert field in e.message


def test_item_cap_is_configurable() -> None:
    e = _err(b'{"user_id":"u","item_ids":["a","b","c"]}', max_items=2)
    assert e.detail[0]["field"] == "item_ids" and "at most 2" in e.detail[0]["message"]


@pytest.mark.parametrize("value", ["abc", "-5", "0", "nan", "inf", ""])
def test_bad_timeout_headers(value: str) -> None:
    with pytest.raises(InvalidRequest, match="X-Request-Timeout-Ms"):
        parse_timeout_header(value)


def test_timeout_header_values() -> None:
    assert parse_timeout_header(None) is None
    assert parse_timeout_header("5") == 5.0
    assert parse_timeout_header(" 2.5 ") == 2.5


def test_settings_defaults_and_env(monkeypatch: pytest.MonkeyPatch) -> None:
    s = load_settings()
    assert (
        s.budget_total_ms,
        s.budget_features_ms,
        s.budget_inference_ms,
        s.budget_postprocess_ms,
    ) == (50, 15, 30, 5)
    assert s.max_items == 500 and s.embedded
    monkeypatch.setenv("GATEWAY_REDIS_URL", "redis://localhost:6379/0")
    monkeypatch.setenv("GATEWAY_BUDGET_TOTAL_MS", "20")
    s = load_settings()
    assert s.redis_url == "redis://localhost:6379/0" and s.budget_total_ms == 20 and not s.embedded


def test_settings_errors_name_each_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GATEWAY_REDIS_URL", "http://x")
    monkeypatch.setenv("GATEWAY_BUDGET_TOTAL_MS", "-1")
    monkeypatch.setenv("GATEWAY_TRITON_URL", "nohostport")
    with pytest.raises(ConfigError) as info:
        load_settings()
    msg = str(info.value)
    for name in ("GATEWAY_REDIS_URL", "GATEWAY_BUDGET_TOTAL_MS", "GATEWAY_TRITON_URL"):
        assert name in msg
