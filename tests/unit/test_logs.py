"""smtp_proxy.logs: JSON lines, correlation ids, redaction, text format, levels."""

from __future__ import annotations

import contextvars
import io
import json
import logging
import threading
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from smtp_proxy.config import LoggingConfig
from smtp_proxy.logs import (
    REDACTED,
    apply_level,
    configure_logging,
    correlation,
    get_correlation_id,
    set_correlation_id,
    stop_background_writer,
)

LOGGER = "smtp_proxy.tests.logs"


pytestmark = pytest.mark.usefixtures("restore_logging")


def json_stream(level: str = "debug") -> io.StringIO:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level=level, format="json"), stream=stream)
    return stream


def lines(stream: io.StringIO) -> list[dict[str, Any]]:
    """Every line must be one complete JSON object."""
    text = stream.getvalue()
    assert text.endswith("\n") or text == ""
    parsed = []
    for line in text.splitlines():
        obj = json.loads(line)
        assert isinstance(obj, dict)
        parsed.append(obj)
    return parsed


def only_line(stream: io.StringIO) -> dict[str, Any]:
    parsed = lines(stream)
    assert len(parsed) == 1, parsed
    return parsed[0]


# --- the JSON line ------------------------------------------------------------------------------


def test_one_json_object_per_line_with_the_standard_keys() -> None:
    stream = json_stream()
    log = logging.getLogger(LOGGER)
    before = datetime.now(UTC)
    log.info("first %s", "line")
    log.warning("second line")
    log.error("third\nline with a newline")
    after = datetime.now(UTC)

    parsed = lines(stream)
    assert len(stream.getvalue().splitlines()) == 3
    assert [p["message"] for p in parsed] == ["first line", "second line", "third\nline with a newline"]
    assert [p["level"] for p in parsed] == ["info", "warning", "error"]
    for obj in parsed:
        assert {"timestamp", "level", "logger", "message", "correlation_id"} <= set(obj)
        assert obj["logger"] == LOGGER
        assert obj["correlation_id"] is None
        stamp = obj["timestamp"]
        assert stamp.endswith("Z")
        moment = datetime.fromisoformat(stamp.replace("Z", "+00:00"))
        assert moment.utcoffset() == timedelta(0)
        # Milliseconds precision: allow for the truncation.
        assert before - timedelta(milliseconds=1) <= moment <= after + timedelta(milliseconds=1)


@pytest.mark.parametrize(
    ("method", "level"),
    [
        ("debug", "debug"),
        ("info", "info"),
        ("warning", "warning"),
        ("error", "error"),
        ("critical", "critical"),
    ],
)
def test_level_is_lowercase(method: str, level: str) -> None:
    stream = json_stream("debug")
    getattr(logging.getLogger(LOGGER), method)("x")
    assert only_line(stream)["level"] == level


def test_event_fields_from_extra_become_keys() -> None:
    stream = json_stream()
    logging.getLogger(LOGGER).info(
        "message accepted",
        extra={"event": "smtp.accepted", "account": "acme", "size": 1234, "recipients": ["a@b.example"]},
    )
    obj = only_line(stream)
    assert obj["event"] == "smtp.accepted"
    assert obj["account"] == "acme"
    assert obj["size"] == 1234
    assert obj["recipients"] == ["a@b.example"]
    assert obj["message"] == "message accepted"


def test_exception_is_logged_inside_the_json_line() -> None:
    stream = json_stream()
    try:
        raise RuntimeError("kaboom")
    except RuntimeError:
        logging.getLogger(LOGGER).exception("it failed")
    obj = only_line(stream)
    assert obj["level"] == "error"
    assert "kaboom" in json.dumps(obj)


# --- correlation ids ----------------------------------------------------------------------------


def test_correlation_id_is_null_outside_and_set_inside_a_block() -> None:
    stream = json_stream()
    log = logging.getLogger(LOGGER)
    log.info("before")
    with correlation() as cid:
        assert cid
        assert get_correlation_id() == cid
        log.info("inside")
    log.info("after")
    assert get_correlation_id() is None
    before, inside, after = lines(stream)
    assert before["correlation_id"] is None
    assert inside["correlation_id"] == cid
    assert after["correlation_id"] is None


def test_new_correlation_ids_differ() -> None:
    with correlation() as first:
        pass
    with correlation() as second:
        pass
    assert first != second


def test_given_correlation_id_is_used() -> None:
    stream = json_stream()
    with correlation("req-42") as cid:
        logging.getLogger(LOGGER).info("inside")
    assert cid == "req-42"
    assert only_line(stream)["correlation_id"] == "req-42"


def test_nested_correlation_restores_the_outer_id() -> None:
    stream = json_stream()
    log = logging.getLogger(LOGGER)
    with correlation("outer"):
        log.info("a")
        with correlation("inner"):
            log.info("b")
        log.info("c")
    log.info("d")
    assert [p["correlation_id"] for p in lines(stream)] == ["outer", "inner", "outer", None]


def test_nested_correlation_restores_the_outer_id_after_an_exception() -> None:
    with correlation("outer"):
        with pytest.raises(ValueError):
            with correlation("inner"):
                raise ValueError("x")
        assert get_correlation_id() == "outer"
    assert get_correlation_id() is None


def test_set_correlation_id() -> None:
    stream = json_stream()
    log = logging.getLogger(LOGGER)
    set_correlation_id("conn-1")
    log.info("one")
    set_correlation_id("conn-2")
    log.info("two")
    set_correlation_id(None)
    log.info("three")
    assert [p["correlation_id"] for p in lines(stream)] == ["conn-1", "conn-2", None]


def test_threads_each_see_their_own_correlation_id() -> None:
    stream = json_stream()
    log = logging.getLogger(LOGGER)
    barrier = threading.Barrier(2, timeout=10)
    seen: dict[str, list[str | None]] = {}
    errors: list[BaseException] = []

    def work(name: str) -> None:
        try:
            with correlation(f"cid-{name}"):
                barrier.wait()  # both ids are set now
                seen[name] = [get_correlation_id()]
                log.info("from %s", name, extra={"worker": name})
                barrier.wait()  # both have logged; neither block has exited
                seen[name].append(get_correlation_id())
        except BaseException as exc:  # reported to the main thread
            errors.append(exc)

    with correlation("main"):
        threads = [threading.Thread(target=work, args=(n,)) for n in ("a", "b")]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=10)
        assert get_correlation_id() == "main"
    assert not errors
    assert seen == {"a": ["cid-a", "cid-a"], "b": ["cid-b", "cid-b"]}
    by_worker = {p["worker"]: p["correlation_id"] for p in lines(stream)}
    assert by_worker == {"a": "cid-a", "b": "cid-b"}


def test_a_thread_given_a_copy_of_the_context_sees_the_id() -> None:
    seen: list[str | None] = []
    with correlation("copied") as cid:
        context = contextvars.copy_context()
        thread = threading.Thread(target=lambda: seen.append(context.run(get_correlation_id)))
        thread.start()
        thread.join(timeout=10)
    assert seen == [cid]


# --- redaction ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "field",
    ["password", "body", "data", "authorization", "secret", "smtp_password", "Password", "AUTHORIZATION"],
)
def test_secret_fields_never_show_their_value(field: str) -> None:
    stream = json_stream()
    value = "s3cr3t-VALUE-that-must-not-appear"
    logging.getLogger(LOGGER).info("event", extra={field: value, "event": "test.redaction"})
    text = stream.getvalue()
    assert value not in text
    assert "s3cr3t" not in text
    obj = only_line(stream)
    assert obj[field] == REDACTED
    assert obj["event"] == "test.redaction"


@pytest.mark.parametrize("value", [b"raw message bytes", {"nested": "s3cr3t"}, ["s3cr3t"], 123456789])
def test_secret_fields_of_any_type_are_redacted(value: Any) -> None:
    stream = json_stream()
    logging.getLogger(LOGGER).info("event", extra={"body": value, "password": value})
    obj = only_line(stream)
    assert obj["body"] == REDACTED
    assert obj["password"] == REDACTED
    assert "s3cr3t" not in stream.getvalue()
    assert "raw message bytes" not in stream.getvalue()
    assert "123456789" not in stream.getvalue()


def test_api_key_keeps_only_a_six_character_prefix() -> None:
    stream = json_stream()
    api_key = "0123456789abcdef" * 4
    logging.getLogger(LOGGER).info("key used", extra={"api_key": api_key})
    obj = only_line(stream)
    assert obj["api_key"] == "012345…"
    assert api_key[:7] not in stream.getvalue()


def test_redaction_also_applies_to_the_text_format() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="text"), stream=stream)
    logging.getLogger(LOGGER).info(
        "auth", extra={"password": "hunter2-hunter2", "api_key": "abcdef0123456789" * 4, "user": "acme"}
    )
    text = stream.getvalue()
    assert "hunter2" not in text
    assert "abcdef0123456789" not in text
    assert "abcdef…" in text
    assert "user=acme" in text


def test_ordinary_fields_are_not_redacted() -> None:
    stream = json_stream()
    logging.getLogger(LOGGER).info("ok", extra={"account": "acme", "password_changed": True})
    obj = only_line(stream)
    assert obj["account"] == "acme"
    assert obj["password_changed"] is True


# --- text format, levels, handlers --------------------------------------------------------------


def test_text_format_is_a_plain_line_with_the_message() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="text"), stream=stream)
    with correlation("cid-text"):
        logging.getLogger(LOGGER).warning("disk %s", "almost full", extra={"free": 3})
    text = stream.getvalue()
    assert len(text.splitlines()) == 1
    line = text.splitlines()[0]
    with pytest.raises(json.JSONDecodeError):
        json.loads(line)
    assert "disk almost full" in line
    assert "WARNING" in line
    assert LOGGER in line
    assert "cid-text" in line
    assert "free=3" in line


def test_configured_level_filters_lower_records() -> None:
    stream = json_stream("warning")
    log = logging.getLogger(LOGGER)
    log.debug("debug")
    log.info("info")
    log.warning("warning")
    log.error("error")
    assert [p["message"] for p in lines(stream)] == ["warning", "error"]
    assert logging.getLogger().level == logging.WARNING


def test_apply_level_changes_the_root_level() -> None:
    stream = json_stream("info")
    log = logging.getLogger(LOGGER)
    log.debug("hidden")
    apply_level(LoggingConfig(level="debug"))
    assert logging.getLogger().level == logging.DEBUG
    log.debug("shown")
    apply_level(LoggingConfig(level="error"))
    assert logging.getLogger().level == logging.ERROR
    log.warning("hidden too")
    log.error("shown too")
    assert [p["message"] for p in lines(stream)] == ["shown", "shown too"]


def test_configure_logging_replaces_previous_root_handlers() -> None:
    root = logging.getLogger()
    stray = io.StringIO()
    root.addHandler(logging.StreamHandler(stray))
    first = json_stream()
    second = json_stream()
    handler = configure_logging(LoggingConfig(level="debug"), stream=(third := io.StringIO()))
    assert root.handlers == [handler]
    logging.getLogger(LOGGER).info("once")
    assert stray.getvalue() == ""
    assert first.getvalue() == ""
    assert second.getvalue() == ""
    assert [p["message"] for p in lines(third)] == ["once"]


def test_configure_logging_returns_the_installed_handler() -> None:
    stream = io.StringIO()
    handler = configure_logging(LoggingConfig(), stream=stream)
    assert logging.getLogger().handlers == [handler]
    assert logging.getLogger().level == logging.INFO
    logging.getLogger(LOGGER).info("x")
    assert only_line(stream)["message"] == "x"


def test_short_api_key_is_redacted_whole() -> None:
    stream = json_stream()
    logging.getLogger(LOGGER).info("auth", extra={"api_key": "abc123"})
    assert only_line(stream)["api_key"] == "[redacted]"


def test_names_containing_a_secret_word_and_nested_secrets_are_redacted() -> None:
    stream = json_stream()
    logging.getLogger(LOGGER).info(
        "change",
        extra={
            "new_password": "hunter2-hunter2",
            "provider": {"name": "sg", "api_key": "k" * 64, "db_secret": "s3"},
        },
    )
    obj = only_line(stream)
    assert obj["new_password"] == "[redacted]"
    assert obj["provider"]["name"] == "sg"
    assert obj["provider"]["db_secret"] == "[redacted]"
    assert obj["provider"]["api_key"] == "kkkkkk…"


# --- the background writer (the listeners) -------------------------------------------------------


def test_background_writer_keeps_each_threads_correlation_id_redaction_and_order() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="debug", format="json"), stream=stream, background=True)
    log = logging.getLogger(LOGGER)

    def session(number: int) -> None:
        set_correlation_id(f"session-{number}")
        for step in range(20):
            log.info(
                "step %d of %s", step, "session", extra={"event": "t.step", "n": number, "password": "pw"}
            )

    threads = [threading.Thread(target=session, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stop_background_writer()  # drains the queue: every line is written before it returns
    parsed = lines(stream)
    assert len(parsed) == 8 * 20
    for number in range(8):
        mine = [line for line in parsed if line["n"] == number]
        assert [line["message"] for line in mine] == [f"step {step} of session" for step in range(20)]
        assert {line["correlation_id"] for line in mine} == {f"session-{number}"}
        assert {line["password"] for line in mine} == {REDACTED}


def test_background_writer_formats_exceptions_after_the_fact() -> None:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=stream, background=True)
    try:
        raise ValueError("boom")
    except ValueError:
        logging.getLogger(LOGGER).exception("failed", extra={"event": "t.failed"})
    stop_background_writer()
    line = only_line(stream)
    assert "ValueError: boom" in line["exc_info"]
    assert line["event"] == "t.failed"


def test_reconfiguring_drains_the_previous_background_writer() -> None:
    first = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=first, background=True)
    logging.getLogger(LOGGER).info("to the first", extra={"event": "t.first"})
    second = io.StringIO()
    configure_logging(LoggingConfig(level="info", format="json"), stream=second)
    assert only_line(first)["message"] == "to the first"
    logging.getLogger(LOGGER).info("to the second", extra={"event": "t.second"})
    assert only_line(second)["message"] == "to the second"
