"""SmtpSession: greeting, EHLO/HELO, STARTTLS, simple commands, line limits, pipelining, closing."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp.protocol import AuthOutcome, CredentialsOffered, MessageReceived, TlsRequested

EHLO_PLAIN_TEXT = (
    b"250-mx.test\r\n"
    b"250-SIZE 1048576\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-DSN\r\n"
    b"250 STARTTLS\r\n"
)
EHLO_TLS = (
    b"250-mx.test\r\n"
    b"250-SIZE 1048576\r\n"
    b"250-PIPELINING\r\n"
    b"250-8BITMIME\r\n"
    b"250-ENHANCEDSTATUSCODES\r\n"
    b"250-DSN\r\n"
    b"250 AUTH PLAIN LOGIN\r\n"
)
UNRECOGNIZED = b"500 5.5.2 Syntax error, command unrecognized\r\n"
LINE_TOO_LONG = b"500 5.5.2 Line too long\r\n"
SYNTAX = b"501 5.5.4 Syntax error in parameters or arguments\r\n"
EHLO_FIRST = b"503 5.5.1 Send EHLO first\r\n"
OK = b"250 2.0.0 OK\r\n"
BYE = b"221 2.0.0 Bye\r\n"


def ehlo_lines(wire: bytes) -> list[bytes]:
    """The text of each EHLO reply line, without code and separator."""
    return [line[4:] for line in wire.split(b"\r\n") if line]


# --- greeting and EHLO/HELO ------------------------------------------------------------------------


def test_greeting_names_host_without_enhanced_code(driver) -> None:
    out = driver.session.greeting()
    assert driver.wire(out) == b"220 mx.test ESMTP smtp-proxy\r\n"
    assert not out[0].close


def test_ehlo_advertises_starttls_and_no_auth_before_tls(driver) -> None:
    out = driver.send(b"EHLO client.test\r\n")
    assert driver.wire(out) == EHLO_PLAIN_TEXT
    assert not any(line.startswith(b"AUTH") for line in ehlo_lines(driver.wire(out)))


def test_ehlo_advertises_configured_size(make_driver) -> None:
    driver = make_driver(max_message_size=12345)
    lines = ehlo_lines(driver.wire(driver.send(b"EHLO client.test\r\n")))
    assert b"SIZE 12345" in lines


def test_ehlo_omits_starttls_when_tls_unavailable(make_driver) -> None:
    driver = make_driver(tls_available=False)
    lines = ehlo_lines(driver.wire(driver.send(b"EHLO client.test\r\n")))
    assert b"STARTTLS" not in lines
    assert not any(line.startswith(b"AUTH") for line in lines)


def test_ehlo_advertises_auth_and_no_starttls_after_tls(driver) -> None:
    driver.ehlo()
    assert driver.starttls() == []
    out = driver.send(b"EHLO client.test\r\n")
    assert driver.wire(out) == EHLO_TLS
    assert b"STARTTLS" not in ehlo_lines(driver.wire(out))


def test_ehlo_advertises_auth_from_the_start_with_implicit_tls(make_driver) -> None:
    driver = make_driver(tls_active=True)
    assert driver.wire(driver.send(b"EHLO client.test\r\n")) == EHLO_TLS


def test_ehlo_is_case_insensitive_verb(driver) -> None:
    assert driver.wire(driver.send(b"ehlo client.test\r\n")) == EHLO_PLAIN_TEXT


def test_ehlo_without_argument_is_501(driver) -> None:
    assert driver.wire(driver.send(b"EHLO\r\n")) == b"501 5.5.4 Syntax: EHLO hostname\r\n"


def test_ehlo_with_blank_argument_is_501(driver) -> None:
    assert driver.wire(driver.send(b"EHLO   \r\n")) == b"501 5.5.4 Syntax: EHLO hostname\r\n"


def test_helo_replies_with_hostname(driver) -> None:
    assert driver.wire(driver.send(b"HELO client.test\r\n")) == b"250 mx.test\r\n"


def test_helo_without_argument_is_501(driver) -> None:
    assert driver.wire(driver.send(b"HELO\r\n")) == b"501 5.5.4 Syntax: EHLO hostname\r\n"


def test_starttls_after_helo_is_503(driver) -> None:
    driver.send(b"HELO client.test\r\n")
    assert driver.wire(driver.send(b"STARTTLS\r\n")) == EHLO_FIRST


# --- STARTTLS ------------------------------------------------------------------------------------


def test_starttls_replies_220_and_requests_tls(driver) -> None:
    driver.ehlo()
    out = driver.send(b"STARTTLS\r\n")
    assert driver.wire(out) == b"220 2.0.0 Ready to start TLS\r\n"
    assert out[-1] == TlsRequested()
    assert driver.session.paused


def test_starttls_requires_new_ehlo_after_handshake(driver) -> None:
    driver.ehlo()
    driver.starttls()
    assert driver.wire(driver.send(b"MAIL FROM:<alice@example.com>\r\n")) == EHLO_FIRST
    assert driver.wire(driver.send(b"AUTH PLAIN AGFsaWNlAHNlY3JldA==\r\n")) == EHLO_FIRST
    assert driver.wire(driver.send(b"EHLO client.test\r\n")) == EHLO_TLS


def test_starttls_with_argument_is_501(driver) -> None:
    driver.ehlo()
    out = driver.send(b"STARTTLS now\r\n")
    assert driver.wire(out) == SYNTAX
    assert not driver.session.paused


def test_starttls_twice_after_tls_is_503(secure_driver) -> None:
    out = secure_driver.send(b"STARTTLS\r\n")
    assert secure_driver.wire(out) == b"503 5.5.1 TLS already active\r\n"
    assert not secure_driver.events(out)


def test_starttls_with_implicit_tls_is_503(make_driver) -> None:
    driver = make_driver(tls_active=True)
    driver.ehlo()
    assert driver.wire(driver.send(b"STARTTLS\r\n")) == b"503 5.5.1 TLS already active\r\n"


def test_starttls_when_tls_unavailable_is_454(make_driver) -> None:
    driver = make_driver(tls_available=False)
    driver.ehlo()
    out = driver.send(b"STARTTLS\r\n")
    assert driver.wire(out) == b"454 4.7.0 TLS not available\r\n"
    assert not driver.events(out)
    assert not driver.session.paused


def test_starttls_before_ehlo_is_503(driver) -> None:
    out = driver.send(b"STARTTLS\r\n")
    assert driver.wire(out) == EHLO_FIRST
    assert not driver.events(out)


def test_starttls_discards_pipelined_commands_cve_2011_0411(driver) -> None:
    driver.ehlo()
    out = driver.send(b"STARTTLS\r\nMAIL FROM:<a@b.c>\r\nRCPT TO:<x@y.z>\r\n")
    assert driver.wire(out) == b"220 2.0.0 Ready to start TLS\r\n"
    assert out[-1] == TlsRequested()
    # Nothing of what was injected in plain text is answered once TLS is up.
    assert driver.tls_started() == []
    assert driver.wire(driver.send(b"EHLO client.test\r\n")) == EHLO_TLS


def test_starttls_discards_pipelined_partial_line(driver) -> None:
    driver.ehlo()
    driver.send(b"STARTTLS\r\nNOOP")
    assert driver.tls_started() == []
    # The half line "NOOP" sent in plain text must not be glued to the first line under TLS.
    assert driver.wire(driver.send(b"EHLO client.test\r\n")) == EHLO_TLS


# --- simple commands -----------------------------------------------------------------------------


def test_rset_replies_ok(driver) -> None:
    driver.ehlo()
    assert driver.wire(driver.send(b"RSET\r\n")) == OK


def test_rset_with_argument_is_501(driver) -> None:
    driver.ehlo()
    assert driver.wire(driver.send(b"RSET all\r\n")) == SYNTAX


def test_noop_replies_ok_before_ehlo(driver) -> None:
    assert driver.wire(driver.send(b"NOOP\r\n")) == OK


def test_noop_with_argument_replies_ok(driver) -> None:
    assert driver.wire(driver.send(b"NOOP hello\r\n")) == OK


def test_vrfy_replies_252(driver) -> None:
    out = driver.send(b"VRFY bob\r\n")
    assert (
        driver.wire(out)
        == b"252 2.5.0 Cannot VRFY user, but will accept the message and attempt delivery\r\n"
    )


def test_vrfy_without_argument_is_501(driver) -> None:
    assert driver.wire(driver.send(b"VRFY\r\n")) == SYNTAX


def test_help_replies_214(driver) -> None:
    out = driver.send(b"HELP\r\n")
    assert driver.codes(out) == [214]
    assert driver.wire(out).startswith(b"214 2.0.0 ")


def test_quit_replies_221_and_closes(driver) -> None:
    out = driver.send(b"QUIT\r\n")
    assert driver.wire(out) == BYE
    assert out[0].close
    assert driver.session.closed


def test_quit_ignores_later_input(driver) -> None:
    out = driver.send(b"QUIT\r\nNOOP\r\nEHLO client.test\r\n")
    assert driver.wire(out) == BYE
    assert driver.send(b"NOOP\r\n") == []


def test_unknown_command_is_500(driver) -> None:
    out = driver.send(b"FOO bar\r\n")
    assert driver.wire(out) == UNRECOGNIZED
    assert not out[0].close


def test_empty_line_is_500(driver) -> None:
    assert driver.wire(driver.send(b"\r\n")) == UNRECOGNIZED


def test_expn_is_502(driver) -> None:
    assert driver.wire(driver.send(b"EXPN staff\r\n")) == b"502 5.5.1 Command not implemented\r\n"


@pytest.mark.parametrize("verb", [b"ETRN", b"TURN"])
def test_obsolete_command_is_502(driver, verb: bytes) -> None:
    assert driver.codes(driver.send(verb + b" x\r\n")) == [502]


def test_command_with_bare_lf_is_accepted(driver) -> None:
    assert driver.wire(driver.send(b"NOOP\n")) == OK


# --- line limits ---------------------------------------------------------------------------------


def test_command_line_of_512_octets_is_accepted(driver) -> None:
    line = b"NOOP " + b"x" * (512 - len(b"NOOP ") - 2) + b"\r\n"
    assert len(line) == 512
    assert driver.wire(driver.send(line)) == OK


def test_command_line_of_513_octets_is_rejected(driver) -> None:
    line = b"NOOP " + b"x" * (513 - len(b"NOOP ") - 2) + b"\r\n"
    assert len(line) == 513
    assert driver.wire(driver.send(line)) == LINE_TOO_LONG
    # The session is still in step: the next command is answered normally.
    assert driver.wire(driver.send(b"NOOP\r\n")) == OK


def test_overlong_line_without_lf_keeps_buffer_bounded(driver) -> None:
    chunk = 8192
    for _ in range(1_048_576 // chunk):
        assert driver.send(b"A" * chunk) == []
        assert len(driver.session._buffer) <= 4096 + chunk
    out = driver.send(b"AAAA\r\nNOOP\r\n")
    assert driver.wire(out) == LINE_TOO_LONG + OK
    assert len(driver.session._buffer) == 0


def test_overlong_line_in_small_chunks_keeps_buffer_bounded(driver) -> None:
    chunk = 1000
    for _ in range(1_048_576 // chunk):
        assert driver.send(b"B" * chunk) == []
        assert len(driver.session._buffer) <= 4096 + chunk
    assert driver.wire(driver.send(b"\r\n")) == LINE_TOO_LONG


# --- error limits and junk -----------------------------------------------------------------------


def test_repeated_errors_close_with_421(driver) -> None:
    out = driver.send(b"FOO\r\n" * 9)
    assert driver.wire(out) == UNRECOGNIZED * 9
    assert not driver.session.closed
    out = driver.send(b"FOO\r\nNOOP\r\n")
    assert driver.wire(out) == b"421 4.7.0 Too many errors, closing connection\r\n"
    assert out[-1].close
    assert driver.session.closed
    assert driver.send(b"NOOP\r\n") == []


def test_repeated_errors_of_mixed_kinds_count_together(driver) -> None:
    bad = b"FOO\r\n" + b"EHLO\r\n" + b"VRFY\r\n" + b"X" * 600 + b"\r\n" + b"EXPN a\r\n"
    out = driver.send(bad * 2)
    assert driver.codes(out) == [500, 501, 501, 500, 502, 500, 501, 501, 500, 421]
    assert driver.session.closed


def test_http_request_as_first_command_closes(driver) -> None:
    out = driver.send(b"GET / HTTP/1.1\r\nHost: mx.test\r\n\r\n")
    assert driver.wire(out) == b"500 5.5.2 This is an SMTP service, not HTTP\r\n"
    assert out[0].close
    assert driver.session.closed


def test_http_like_line_after_first_command_is_plain_500(driver) -> None:
    driver.ehlo()
    out = driver.send(b"POST /x HTTP/1.0\r\n")
    assert driver.wire(out) == UNRECOGNIZED
    assert not driver.session.closed


def test_non_ascii_command_is_500(driver) -> None:
    out = driver.send("EHLO clïent.test\r\n".encode())
    assert driver.wire(out) == UNRECOGNIZED
    assert not driver.session.closed


# --- pipelining ----------------------------------------------------------------------------------


def test_pipelined_commands_are_answered_in_order(driver) -> None:
    out = driver.send(b"EHLO client.test\r\nNOOP\r\nVRFY x\r\nFOO\r\nRSET\r\n")
    assert driver.codes(out) == [250, 250, 252, 500, 250]


def test_pipelined_commands_split_across_receives_are_reassembled(driver) -> None:
    assert driver.wire(driver.send(b"NOOP\r\nNO")) == OK
    assert driver.send(b"OP\r") == []
    assert driver.wire(driver.send(b"\n")) == OK


def test_pipelined_commands_behind_auth_wait_for_answer(secure_driver, plain) -> None:
    driver = secure_driver
    out = driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\nMAIL FROM:<alice@example.com>\r\nNOOP\r\n")
    assert out == [CredentialsOffered("PLAIN", "alice", "secret")]
    out = driver.credentials_checked(AuthOutcome.OK, driver.Account("alice", ("example.com",)))
    assert driver.wire(out) == (
        b"235 2.7.0 Authentication successful\r\n250 2.1.0 Sender OK\r\n250 2.0.0 OK\r\n"
    )


def test_pipelined_commands_behind_end_of_data_wait_for_answer(authed_driver) -> None:
    driver = authed_driver
    out = driver.send(
        b"MAIL FROM:<alice@example.com>\r\nRCPT TO:<bob@dest.test>\r\nDATA\r\n"
        b"hello\r\n.\r\nNOOP\r\nMAIL FROM:<alice@example.com>\r\n"
    )
    assert driver.codes(out) == [250, 250, 354]
    assert out[-1] == MessageReceived("alice@example.com", ("bob@dest.test",), b"hello\r\n")
    out = driver.message_queued("Q1")
    assert driver.wire(out) == b"250 2.0.0 Ok: queued as Q1\r\n" + OK + b"250 2.1.0 Sender OK\r\n"


def test_receive_while_paused_buffers_and_returns_nothing(secure_driver, plain) -> None:
    driver = secure_driver
    driver.send(f"AUTH PLAIN {plain('alice', 'secret')}\r\n")
    assert driver.session.paused
    assert driver.send(b"NOOP\r\n") == []
    assert driver.send(b"RSET\r\n") == []
    out = driver.credentials_checked(AuthOutcome.OK, driver.Account("alice", ("example.com",)))
    assert driver.codes(out) == [235, 250, 250]
    assert not driver.session.paused


@pytest.mark.parametrize(
    "answer",
    [
        lambda s: s.tls_started(),
        lambda s: s.credentials_checked(AuthOutcome.INVALID),
        lambda s: s.message_queued("Q1"),
        lambda s: s.message_deferred(),
    ],
    ids=["tls_started", "credentials_checked", "message_queued", "message_deferred"],
)
def test_answer_raises_runtime_error_when_nothing_pending(driver, answer) -> None:
    driver.ehlo()
    with pytest.raises(RuntimeError):
        answer(driver.session)


def test_answer_raises_runtime_error_after_event_answered(driver) -> None:
    driver.ehlo()
    driver.starttls()
    with pytest.raises(RuntimeError):
        driver.tls_started()


# --- closing from the outside --------------------------------------------------------------------


def test_timed_out_replies_421_and_closes(driver) -> None:
    driver.ehlo()
    out = driver.session.timed_out()
    assert driver.wire(out) == b"421 4.4.2 Idle timeout, closing connection\r\n"
    assert out[0].close
    assert driver.session.closed
    assert driver.send(b"NOOP\r\n") == []


def test_shutting_down_replies_421_and_closes(driver) -> None:
    out = driver.session.shutting_down()
    assert driver.wire(out) == b"421 4.3.2 Service shutting down, try again later\r\n"
    assert out[0].close
    assert driver.session.closed
    assert driver.send(b"NOOP\r\n") == []


def test_input_received_while_starttls_is_pending_never_runs_inside_tls(driver) -> None:
    driver.send("EHLO client.test\r\n")
    driver.send("STARTTLS\r\n")
    # Plaintext that arrives between the 220 and the handshake (CVE-2011-0411).
    assert driver.send("MAIL FROM:<a@example.com>\r\n") == []
    assert driver.tls_started() == []
    assert driver.codes(driver.send("NOOP\r\n")) == [250]


def test_answering_the_wrong_event_is_a_caller_error(driver) -> None:
    driver.send("EHLO client.test\r\n")
    driver.send("STARTTLS\r\n")
    with pytest.raises(RuntimeError):
        driver.message_queued("id")
    assert driver.tls_started() == []
