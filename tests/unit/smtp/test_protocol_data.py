"""SmtpSession: DATA framing, dot-unstuffing, SMTP smuggling, bare CR/LF and size limits."""

from __future__ import annotations

import random

import pytest

from smtp_proxy.smtp.protocol import MessageReceived, MessageRejected

SENDER = "alice@example.com"
RECIPIENT = "bob@dest.test"
QUEUED = b"250 2.0.0 Ok: queued as %s\r\n"
BARE_CR = b"554 5.6.0 Bare CR in message data; lines must end with CRLF\r\n"
# The limit in the reply: every test here that goes over it sets 1024 octets.
TOO_BIG = b"552 5.3.4 Message size exceeds fixed maximum message size of 1024 bytes (1 KiB)\r\n"
SENDER_OK = b"250 2.1.0 Sender OK\r\n"
ENVELOPE = b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n"

# One stream with most framing corner cases; the body up to the terminator, and what is stored.
TRICKY_BODY = (
    b"Subject: framing\r\n"
    b"\r\n"
    b"..leading dot\r\n"
    b"..\r\n"
    b"...\r\n"
    b"not.a.terminator\r\n"
    b" .\r\n"
    b".x\r\n"
    b"bare lf\n"
    b".\n"
    b"..after bare lf\r\n"
    b"\r\n"
    b"last line\r\n"
)
TRICKY_STORED = (
    b"Subject: framing\r\n"
    b"\r\n"
    b".leading dot\r\n"
    b".\r\n"
    b"..\r\n"
    b"not.a.terminator\r\n"
    b" .\r\n"
    b"x\r\n"
    b"bare lf\r\n"
    b".\r\n"
    b".after bare lf\r\n"
    b"\r\n"
    b"last line\r\n"
)


def data_stream(driver, body: bytes, after: bytes = b"") -> list:
    """Open a transaction and send ``body`` followed by the terminator and ``after``."""
    driver.open_data(SENDER, [RECIPIENT])
    return driver.send(body + b".\r\n" + after)


def only_message(driver, outputs: list) -> MessageReceived:
    (message,) = driver.received(outputs)
    assert driver.session.paused
    return message


# --- framing -------------------------------------------------------------------------------------


def test_data_ends_only_at_crlf_dot_crlf(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    assert driver.send(b"line one\r\n") == []
    assert driver.send(b"x.\r\n. \r\n.x\r\n") == []
    out = driver.send(b".\r\n")
    message = only_message(driver, out)
    # RFC 5321 4.5.2: a leading dot followed by anything is removed, also on ". ".
    assert message.data == b"line one\r\nx.\r\n \r\nx\r\n"
    assert message.sender == SENDER
    assert message.recipients == (RECIPIENT,)


def test_data_dot_unstuffing_removes_one_leading_dot(authed_driver) -> None:
    message = only_message(authed_driver, data_stream(authed_driver, b"..x\r\n..\r\n...\r\n"))
    assert message.data == b".x\r\n.\r\n..\r\n"


def test_data_is_stored_exactly(authed_driver) -> None:
    message = only_message(authed_driver, data_stream(authed_driver, TRICKY_BODY))
    assert message.data == TRICKY_STORED


def test_data_with_8bit_content_is_stored_exactly(authed_driver) -> None:
    body = "Grüße, ☃\r\n".encode() + bytes(range(0x80, 0x100)) + b"\r\n"
    message = only_message(authed_driver, data_stream(authed_driver, body))
    assert message.data == body


def test_data_empty_message_gives_empty_data(authed_driver) -> None:
    message = only_message(authed_driver, data_stream(authed_driver, b""))
    assert message.data == b""


def test_data_terminator_in_same_receive_as_data_command(authed_driver) -> None:
    out = authed_driver.send(ENVELOPE + b"hello\r\n.\r\n")
    assert authed_driver.codes(out) == [250, 250, 354]
    assert only_message(authed_driver, out).data == b"hello\r\n"


@pytest.mark.parametrize(
    "parts",
    [
        [b"hello\r\n", b".\r\n"],
        [b"hello\r\n.", b"\r\n"],
        [b"hello\r\n.\r", b"\n"],
        [b"hello\r", b"\n.\r\n"],
        [b"hello\r\n", b".", b"\r", b"\n"],
    ],
    ids=["before-dot", "after-dot", "between-cr-lf", "inside-first-crlf", "every-byte"],
)
def test_data_terminator_split_across_receives(authed_driver, parts: list[bytes]) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    outputs = [driver.send(part) for part in parts]
    assert all(out == [] for out in outputs[:-1])
    assert only_message(driver, outputs[-1]).data == b"hello\r\n"


def whole_stream() -> bytes:
    return ENVELOPE + TRICKY_BODY + b".\r\nQUIT\r\n"


def expected_message() -> MessageReceived:
    return MessageReceived(SENDER, (RECIPIENT,), TRICKY_STORED)


@pytest.mark.parametrize("size", [1, 2, 3, 7, 1000])
def test_data_chunking_does_not_change_result(authed_driver, size: int) -> None:
    driver = authed_driver
    out = driver.send_chunks(whole_stream(), size)
    assert driver.codes(out) == [250, 250, 354]
    assert driver.received(out) == [expected_message()]
    assert driver.received(out)[0].data == TRICKY_STORED
    assert driver.wire(driver.message_queued("Q1")) == QUEUED % b"Q1" + b"221 2.0.0 Bye\r\n"


def test_data_split_at_every_boundary_gives_same_result(make_driver) -> None:
    stream = whole_stream()
    for cut in range(1, len(stream)):
        driver = make_driver().authenticated()
        out = driver.send(stream[:cut]) + driver.send(stream[cut:])
        assert driver.codes(out) == [250, 250, 354], cut
        assert driver.received(out) == [expected_message()], cut
        assert driver.codes(driver.message_queued("Q")) == [250, 221], cut


def test_data_pipelined_quit_answered_after_message_queued(authed_driver) -> None:
    driver = authed_driver
    out = data_stream(driver, b"hello\r\n", after=b"QUIT\r\n")
    assert out == [MessageReceived(SENDER, (RECIPIENT,), b"hello\r\n")]
    out = driver.message_queued("id")
    assert driver.wire(out) == b"250 2.0.0 Ok: queued as id\r\n221 2.0.0 Bye\r\n"
    assert out[-1].close
    assert driver.session.closed


def test_data_message_deferred_is_451_and_session_stays_usable(authed_driver) -> None:
    driver = authed_driver
    data_stream(driver, b"hello\r\n")
    out = driver.message_deferred()
    assert driver.wire(out) == b"451 4.3.0 Temporary storage failure, try again later\r\n"
    assert not driver.session.closed
    out = data_stream(driver, b"again\r\n")
    assert only_message(driver, out).data == b"again\r\n"
    assert driver.wire(driver.message_queued("Q2")) == QUEUED % b"Q2"


def test_data_two_messages_in_one_session(authed_driver) -> None:
    driver = authed_driver
    first = only_message(driver, data_stream(driver, b"one\r\n"))
    driver.message_queued("Q1")
    second = only_message(driver, data_stream(driver, b"two\r\n"))
    assert (first.data, second.data) == (b"one\r\n", b"two\r\n")


# --- SMTP smuggling ------------------------------------------------------------------------------

SMUGGLED = b"MAIL FROM:<evil@example.com>\r\nRCPT TO:<x@y.z>\r\nDATA\r\nsmuggled\r\n"
BARE_CR_VARIANTS = {b"\r\n.\r", b"\r.\r\n", b"\r.\r"}


@pytest.mark.parametrize(
    "variant",
    [b"\n.\n", b"\n.\r\n", b"\r\n.\r", b"\r.\r\n", b"\r\n.\n", b"\r.\r"],
    ids=["lf-dot-lf", "lf-dot-crlf", "crlf-dot-cr", "cr-dot-crlf", "crlf-dot-lf", "cr-dot-cr"],
)
@pytest.mark.parametrize("chunk", [None, 1, 5])
def test_data_smuggling_variant_gives_one_outcome(authed_driver, variant: bytes, chunk: int | None) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    stream = b"Subject: hi\r\n\r\nhello" + variant + SMUGGLED + b"\r\n.\r\n" + b"NOOP\r\n"
    out = driver.send(stream) if chunk is None else driver.send_chunks(stream, chunk)
    assert SENDER_OK not in driver.wire(out)
    assert b"354" not in driver.wire(out)
    received, rejected = driver.received(out), driver.rejected(out)
    if variant in BARE_CR_VARIANTS:
        assert received == []
        assert [notice.reason for notice in rejected] == ["bare_cr"]
        assert driver.wire(out) == BARE_CR + b"250 2.0.0 OK\r\n"
    else:
        assert rejected == []
        (message,) = received
        assert b"MAIL FROM:<evil@example.com>\r\n" in message.data
        assert b"smuggled\r\n" in message.data
        assert message.recipients == (RECIPIENT,)
        # The pipelined NOOP waits for the answer; no second message follows it.
        out = driver.message_queued("Q1")
        assert driver.wire(out) == QUEUED % b"Q1" + b"250 2.0.0 OK\r\n"
        assert driver.received(out) == []
    assert not driver.session.paused


def test_data_lf_dot_lf_is_content(authed_driver) -> None:
    message = only_message(authed_driver, data_stream(authed_driver, b"a\n.\nb\r\n"))
    assert message.data == b"a\r\n.\r\nb\r\n"


# --- bare LF and bare CR -------------------------------------------------------------------------


def test_data_bare_lf_line_endings_are_normalised(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    message = only_message(driver, driver.send(b"a\nb\r\n.\r\n"))
    assert message.data == b"a\r\nb\r\n"


def test_data_only_bare_lf_lines_are_normalised(authed_driver) -> None:
    message = only_message(authed_driver, data_stream(authed_driver, b"one\ntwo\n\nthree\r\n"))
    assert message.data == b"one\r\ntwo\r\n\r\nthree\r\n"


@pytest.mark.parametrize(
    "body",
    [
        b"a\rb\r\n",
        b"\rstart\r\n",
        b"end\r\r\n",
        b"a\r\n\r\r\n",
        b"x" * 70000 + b"\ry\r\n",
        b"x\r" + b"x" * 70000 + b"\r\n",
    ],
    ids=["middle", "line-start", "before-crlf", "alone", "end-of-long-line", "start-of-long-line"],
)
def test_data_bare_cr_is_rejected_with_554(authed_driver, body: bytes) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    out = driver.send_chunks(body + b".\r\n", 4096)
    assert driver.received(out) == []
    (notice,) = driver.rejected(out)
    assert notice.reason == "bare_cr"
    assert notice.sender == SENDER
    assert notice.recipients == 1
    assert notice.reply.code == 554
    assert driver.wire(out) == BARE_CR
    assert out.index(notice) < out.index(notice.reply)
    assert not driver.session.paused


def test_data_bare_cr_waits_for_real_terminator(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    assert driver.send(b"a\rb\r\nmore\r\n") == []
    assert driver.send(b"still data\r\n") == []
    assert driver.wire(driver.send(b".\r\n")) == BARE_CR


def test_data_bare_cr_leaves_session_usable(authed_driver) -> None:
    driver = authed_driver
    data_stream(driver, b"a\rb\r\n")
    assert (
        driver.wire(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == b"503 5.5.1 Need MAIL command first\r\n"
    )
    out = data_stream(driver, b"clean\r\n")
    assert only_message(driver, out).data == b"clean\r\n"


# --- lines over 998 octets (RFC 5322 2.1.1) -------------------------------------------------------

LINE_TOO_LONG = b"550 5.6.0 Line too long (RFC 5322 2.1.1)\r\n"


def test_data_header_line_that_cannot_be_folded_is_550_and_the_session_goes_on(authed_driver) -> None:
    """No whitespace to fold at: the worker could not fix it, so it is refused, not lost later."""
    driver = authed_driver
    out = data_stream(driver, b"Subject: x\r\nX-Token: " + b"t" * 1200 + b"\r\n\r\nbody\r\n")
    assert driver.received(out) == []
    (notice,) = driver.rejected(out)
    assert (notice.reason, notice.reply.code, notice.recipients) == ("line_too_long", 550, 1)
    assert notice.detail == "a header line over 998 octets with no whitespace to fold at"
    assert driver.wire(out) == LINE_TOO_LONG
    assert out.index(notice) < out.index(notice.reply)
    assert not driver.session.paused
    # The transaction is over (RSET state); the next one on the same session is taken.
    assert (
        driver.wire(driver.send(b"RCPT TO:<bob@dest.test>\r\n")) == b"503 5.5.1 Need MAIL command first\r\n"
    )
    out = data_stream(driver, b"Subject: fine\r\n\r\nclean\r\n")
    assert only_message(driver, out).data == b"Subject: fine\r\n\r\nclean\r\n"


def test_data_long_line_under_a_signature_is_550(authed_driver) -> None:
    body = (
        b'Content-Type: multipart/signed; boundary="s"; protocol="application/pgp-signature"\r\n\r\n'
        b"--s\r\nContent-Type: text/plain\r\n\r\n" + b"w" * 1500 + b"\r\n--s\r\n"
        b"Content-Type: application/pgp-signature\r\n\r\nsig\r\n--s--\r\n"
    )
    out = data_stream(authed_driver, body)
    assert authed_driver.wire(out) == LINE_TOO_LONG
    assert authed_driver.rejected(out)[0].detail == "a line over 998 octets inside multipart/signed"


@pytest.mark.parametrize(
    "body",
    [
        b"To: " + b", ".join(b"user%d@example.net" % n for n in range(100)) + b"\r\n\r\nbody\r\n",
        b"Subject: long body\r\n\r\n" + b"x" * 1500 + b"\r\n",
        b"Subject: long body\r\n\r\n" + b"y" * 70_000 + b"\r\n",  # passed on in pieces by the reader
    ],
    ids=["folded-header", "body-line", "body-line-over-pending-limit"],
)
def test_data_long_lines_the_worker_can_fix_are_accepted_as_sent(authed_driver, body: bytes) -> None:
    out = data_stream(authed_driver, body)
    assert only_message(authed_driver, out).data == body  # stored as sent; the worker fits it


# --- size limits ---------------------------------------------------------------------------------


def test_data_over_size_limit_is_552_after_terminator(make_driver) -> None:
    driver = make_driver(max_message_size=1024).authenticated()
    driver.open_data(SENDER, [RECIPIENT])
    body = b"x" * 98 + b"\r\n"
    assert driver.send(body * 20) == []  # read on, no verdict yet
    out = driver.send(b".\r\n")
    assert driver.received(out) == []
    (notice,) = driver.rejected(out)
    assert notice == MessageRejected(SENDER, 1, 2000, "too_big", notice.reply)
    assert driver.wire(out) == TOO_BIG
    assert not driver.session.paused


def test_data_over_size_limit_leaves_session_usable(make_driver) -> None:
    driver = make_driver(max_message_size=1024).authenticated()
    out = data_stream(driver, b"y" * 5000 + b"\r\n", after=b"NOOP\r\n")
    assert driver.wire(out) == TOO_BIG + b"250 2.0.0 OK\r\n"
    out = data_stream(driver, b"small\r\n")
    assert only_message(driver, out).data == b"small\r\n"


def test_data_of_exactly_max_size_is_accepted(make_driver) -> None:
    driver = make_driver(max_message_size=1024).authenticated()
    body = b"z" * 1022 + b"\r\n"
    assert len(body) == 1024
    message = only_message(driver, data_stream(driver, body))
    assert message.data == body


def test_data_one_octet_over_max_size_is_rejected(make_driver) -> None:
    driver = make_driver(max_message_size=1024).authenticated()
    out = data_stream(driver, b"z" * 1023 + b"\r\n")
    assert driver.wire(out) == TOO_BIG


def test_data_size_counts_unstuffed_content(make_driver) -> None:
    driver = make_driver(max_message_size=1024).authenticated()
    body = b"." + b"z" * 1022 + b"\r\n"  # 1025 octets on the wire, 1024 after unstuffing
    assert only_message(driver, data_stream(driver, body)).data == body[1:]


# --- long lines ----------------------------------------------------------------------------------


def test_data_long_line_passes_with_bounded_buffer(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    line = b"L" * 200_000
    chunk = 4096
    for start in range(0, len(line), chunk):
        assert driver.send(line[start : start + chunk]) == []
        assert len(driver.session._buffer) <= 65536 + chunk
    message = only_message(driver, driver.send(b"\r\nnext\r\n.\r\n"))
    assert message.data == line + b"\r\nnext\r\n"


def test_data_long_line_with_leading_dot_is_unstuffed_once(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    line = b".." + b"D" * 200_000
    driver.send_chunks(line, 10_000)
    message = only_message(driver, driver.send(b"\r\n.\r\n"))
    assert message.data == b"." + b"D" * 200_000 + b"\r\n"


def test_data_long_line_ending_in_dot_line_does_not_terminate_early(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    driver.send_chunks(b"E" * 100_000, 8192)
    # ".\r\n" continues the long line; it is not a line of its own.
    assert driver.send(b".\r\n") == []
    message = only_message(driver, driver.send(b".\r\n"))
    assert message.data == b"E" * 100_000 + b".\r\n"


def test_data_long_line_of_dots_keeps_all_but_the_first(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    # Every piece passed on (and the byte kept back) starts with a dot; only the line's first goes.
    for size in (70_000, 3, 66_000, 1, 50_000):
        assert driver.send(b"." * size) == []
    message = only_message(driver, driver.send(b"\r\n.\r\n"))
    assert message.data == b"." * (70_000 + 3 + 66_000 + 1 + 50_000 - 1) + b"\r\n"


def test_data_long_line_split_between_cr_and_lf_is_accepted(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    # The first receive ends in the CR of the line's CRLF: that CR is not a bare CR.
    assert driver.send(b"F" * 70_000 + b"\r") == []
    message = only_message(driver, driver.send(b"\n.\r\n"))
    assert message.data == b"F" * 70_000 + b"\r\n"


def test_data_long_line_split_before_dot_line_end_keeps_dot(authed_driver) -> None:
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    assert driver.send(b"G" * 70_000 + b".") == []
    # The "." kept back is inside the long line, not the start of a line.
    message = only_message(driver, driver.send(b"x\r\n.\r\n"))
    assert message.data == b"G" * 70_000 + b".x\r\n"


# --- differential check against a line-by-line reference ----------------------------------------


def reference_outcome(stream: bytes, limit: int) -> tuple[str, bytes]:
    """The documented DATA rules, one LF-terminated line at a time, for the first message.

    The message ends at a line ".\\r\\n" that follows a CRLF (or starts the data); a leading
    dot is removed unless the line is just "."; a bare LF ending becomes CRLF; any other CR
    rejects the message, and so does a size over ``limit`` (which wins).
    """
    position, after_crlf, content, bare_cr = 0, True, [], False
    while True:
        newline = stream.find(b"\n", position)
        assert newline >= 0, "the generated stream always ends with a terminator"
        line, position = stream[position : newline + 1], newline + 1
        if line == b".\r\n" and after_crlf:
            break
        crlf = line.endswith(b"\r\n")
        body = line[:-2] if crlf else line[:-1]
        bare_cr = bare_cr or b"\r" in body
        if body.startswith(b".") and body != b".":
            body = body[1:]
        content.append(body + b"\r\n")
        after_crlf = crlf
    data = b"".join(content)
    if len(data) > limit:
        return "too_big", b""
    if bare_cr:
        return "bare_cr", b""
    return "ok", data


TOKENS = [b"a", b"bc", b".", b"..", b"\r", b"\n", b"\r\n", b"\r\n", b"\r\n.", b".\r\n", b"\n.", b" "]


@pytest.mark.parametrize("seed", range(300))
def test_data_reader_matches_reference_for_random_streams(make_driver, seed: int) -> None:
    rng = random.Random(seed)
    limit = rng.choice([40, 200, 1_000_000])
    parts = [rng.choice(TOKENS) for _ in range(rng.randint(0, 60))]
    if rng.random() < 0.2:
        parts.insert(rng.randint(0, len(parts)), rng.choice([b"x", b".", b"\r"]) + b"y" * 70_000)
    stream = b"".join(parts) + b"\r\n.\r\n"
    expected = reference_outcome(stream, limit)

    driver = make_driver(max_message_size=limit).authenticated()
    driver.open_data(SENDER, [RECIPIENT])
    out = []
    position = 0
    while position < len(stream):
        size = rng.choice([1, 2, 3, 5, 64, 4096, 100_000])
        out.extend(driver.send(stream[position : position + size]))
        position += size
        assert len(driver.session._buffer) <= 65536 + 100_000
    first = next(item for item in out if isinstance(item, MessageReceived | MessageRejected))
    if isinstance(first, MessageReceived):
        assert ("ok", first.data) == expected
    else:
        assert (first.reason, b"") == expected


def test_data_bare_lf_line_then_crlf_lines_in_the_next_read(authed_driver) -> None:
    # A read that starts after a bare LF and holds no bare LF itself (a slip here once cut a byte).
    driver = authed_driver
    driver.open_data(SENDER, [RECIPIENT])
    assert driver.send(b"ab\n") == []
    assert driver.send(b".\r\n") == []  # after a bare LF, "." CRLF is content, not the end
    message = only_message(driver, driver.send(b"end\r\n.\r\n"))
    assert message.data == b"ab\r\n.\r\nend\r\n"


NO_BARE_CR_TOKENS = [b"a", b".", b"..", b"\n", b"\r\n", b"\r\n", b"\r\n.", b"\n.", b".\r\n", b".\n", b" "]


@pytest.mark.parametrize("seed", range(300))
def test_data_reader_matches_reference_without_bare_cr(make_driver, seed: int) -> None:
    """The bulk path (mixed CRLF and bare LF endings) against the line-by-line reference."""
    rng = random.Random(seed)
    stream = b"".join(rng.choice(NO_BARE_CR_TOKENS) for _ in range(rng.randint(0, 80))) + b"\r\n.\r\n"
    expected = reference_outcome(stream, 1_000_000)
    driver = make_driver().authenticated()
    driver.open_data(SENDER, [RECIPIENT])
    out = []
    position = 0
    while position < len(stream):
        size = rng.choice([1, 2, 3, 7, 64])
        out.extend(driver.send(stream[position : position + size]))
        position += size
    (message,) = driver.received(out)
    assert ("ok", message.data) == expected
