"""The SDK's rules that the mesh cannot easily provoke: which failures are retried and how long
after, which events a resumed stream drops, how gRPC field paths are named, and how a target
picks its transport."""

from __future__ import annotations

import pytest
from imagegen import InvalidArgument, QuotaExceeded, RetryPolicy, Unavailable
from imagegen.client import _seen, resolve_target
from imagegen.errors import Conflict, NotFound, Unauthenticated, error_for
from imagegen.grpc_transport import sdk_path
from imagegen.http_transport import retry_after
from imagegen.types import make_options

POLICY = RetryPolicy(attempts=4, initial_backoff=0.2, max_backoff=1.0, max_retry_after=30)


def test_only_what_may_succeed_later_is_retried() -> None:
    assert POLICY.delay(1, Unavailable("connection refused")) is not None
    assert POLICY.delay(1, QuotaExceeded("rate", retry_after=2)) is not None
    for final in (
        QuotaExceeded("budget spent"),  # no Retry-After: it does not free up with time
        InvalidArgument("bad", []),
        Unauthenticated("no key"),
        NotFound("no job"),
        Conflict("key reused"),
    ):
        assert POLICY.delay(1, final) is None, final
    assert POLICY.delay(4, Unavailable("still away")) is None  # the attempts are spent


def test_a_retry_waits_at_least_what_the_server_asked_and_backoff_is_capped() -> None:
    for _ in range(50):
        wait = POLICY.delay(1, QuotaExceeded("rate", retry_after=3))
        assert wait is not None and 3 <= wait <= 4
        capped = POLICY.delay(3, Unavailable("away"))
        assert capped is not None and 0 <= capped <= 1.0
    assert POLICY.delay(1, QuotaExceeded("rate", retry_after=120)) is None  # too long to wait


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert retry_after("7") == 7
    assert retry_after("Wed, 21 Oct 2015 07:28:00 GMT") == 0  # in the past
    assert retry_after(None) is None and retry_after("soon") is None


def test_a_resumed_stream_drops_what_it_saw_but_keeps_a_final_reusing_the_last_id() -> None:
    last = ("1700000000000-3", "Progress")
    assert _seen(last, "1700000000000-3", "Progress")
    assert _seen(last, "1700000000000-2", "Status")
    assert not _seen(last, "1700000000000-4", "Progress")
    assert not _seen(last, "1700000000001-0", "Status")
    # The server ends a stream whose events were lost with a Final carrying the last id.
    assert not _seen(last, "1700000000000-3", "Final")
    assert not _seen(("", ""), "0-0", "Final")


def test_grpc_field_paths_are_named_as_the_sdk_names_them() -> None:
    assert sdk_path("spec.width_px") == "width"
    assert sdk_path("spec.text") == "prompt"
    assert sdk_path("spec.controlnet.mask_key") == "controlnet.mask"
    assert sdk_path("spec.guidance_images[1].role") == "guidance_images[1].role"
    assert sdk_path("spec.fibo_json.text.width_px") == "fibo_json.text.width_px"  # user's keys
    assert sdk_path("idempotency_key") == "idempotency_key"


def test_error_codes_become_the_sdks_exceptions() -> None:
    assert isinstance(error_for("NOT_FOUND", "x"), NotFound)
    assert isinstance(error_for("DEADLINE_EXCEEDED", "x"), Unavailable)
    quota = error_for("RESOURCE_EXHAUSTED", "x", retry_after=5)
    assert isinstance(quota, QuotaExceeded) and quota.retry_after == 5


def test_a_target_picks_the_transport(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("IMAGEGEN_URL", "IMAGEGEN_GRPC_URL"):
        monkeypatch.delenv(name, raising=False)
    assert resolve_target(None, None) == ("http", "http://127.0.0.1:8080", False)
    assert resolve_target("grpcs://api.example:443", None) == ("grpc", "api.example:443", True)
    assert resolve_target("10.0.0.1:50051", "grpc") == ("grpc", "10.0.0.1:50051", False)
    assert resolve_target(None, "grpc") == ("grpc", "127.0.0.1:50051", False)
    monkeypatch.setenv("IMAGEGEN_URL", "https://api.example/")
    assert resolve_target(None, None) == ("http", "https://api.example", True)
    with pytest.raises(ValueError):
        resolve_target("http://127.0.0.1:8080", "grpc")


def test_an_unknown_cache_mode_names_the_field() -> None:
    with pytest.raises(InvalidArgument) as caught:
        make_options({"cache": "sometimes"})
    assert caught.value.fields == ["cache"]
