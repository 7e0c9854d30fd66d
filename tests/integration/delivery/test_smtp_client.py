"""The SMTP client towards an outside host (``delivery.smtp_client``) against a real SMTP server
(SmtpSink) over real sockets on 127.0.0.1.

127.0.0.1 is private, so every test that expects a connection turns delivery.allow_private_networks
on; the guard's own tests turn it off and check that the sink never saw a connection.
"""

from __future__ import annotations

import datetime
import gc
import select
import socket
import ssl
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from smtp_proxy.config import DeliveryConfig, config_from_dict
from smtp_proxy.db.models import DeliveryStatus, ProviderType
from smtp_proxy.delivery import network, smtp_client
from smtp_proxy.delivery.outcome import Outcome, Outgoing, Target
from smtp_proxy.devcert import write_self_signed
from tests.smtp_sink import SmtpSink

PASSWORD = "s3cret-Pa55word"
USER = "relay-user"
BODY = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello.\r\n"
DELIVERED, DEFERRED, FAILED = DeliveryStatus.DELIVERED, DeliveryStatus.DEFERRED, DeliveryStatus.FAILED


@pytest.fixture(scope="module")
def cert_pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1."""
    return write_self_signed(tmp_path_factory.mktemp("tls"), "localhost")


@pytest.fixture
def start_sink(cert_pair: tuple[Path, Path]) -> Iterator[Callable[..., SmtpSink]]:
    """Start sinks (with the shared certificate unless told otherwise) and stop them all afterwards."""
    sinks: list[SmtpSink] = []

    def start(**kwargs: Any) -> SmtpSink:
        if kwargs.get("tls", "none") != "none":
            kwargs.setdefault("cert", cert_pair)
        sink = SmtpSink(**kwargs).start()
        sinks.append(sink)
        return sink

    yield start
    for sink in sinks:
        sink.stop()
    assert [error for sink in sinks for error in sink.errors] == []


def settings(ca_file: Path | str = "", allow_private: bool = True, **delivery: Any) -> DeliveryConfig:
    values = {"allow_private_networks": allow_private, "ca_file": str(ca_file), "connect_timeout": 2.0}
    values = {**values, "send_timeout": 2.0, **delivery}
    return config_from_dict({"delivery": values}, env={}).delivery


def target(smtp_config: dict[str, Any], password: str | None = None) -> Target:
    return Target(uuid.uuid4(), "sink", ProviderType.SMTP, smtp_config=smtp_config, smtp_password=password)


def message(
    data: bytes = BODY, sender: str = "a@example.com", recipients: tuple[str, ...] = ("b@example.net",)
) -> Outgoing:
    return Outgoing(uuid.uuid4(), sender, recipients, data)


def send(
    sink: SmtpSink, outgoing: Outgoing | None = None, username: str | None = None, **kwargs: Any
) -> Outcome:
    """Deliver to sink, trusting its certificate."""
    config = sink.provider_config(username=username)
    config.update(kwargs.pop("smtp", {}))
    password = kwargs.pop("password", PASSWORD if username else None)
    kwargs.setdefault("ca_file", sink.cert_file or "")
    delivery = settings(**kwargs)
    return smtp_client.send(target(config, password), outgoing or message(), delivery)


def closed_port() -> int:
    """A port on 127.0.0.1 with nobody listening."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def resolve_as(monkeypatch: pytest.MonkeyPatch, name: str, *ips: str) -> list[str]:
    """Make name resolve to ips (a stand-in DNS), and return the list of names looked up."""
    real = socket.getaddrinfo
    looked_up: list[str] = []

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        looked_up.append(host)
        if host == name:
            return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in ips]
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    return looked_up


def cert_for_name_only(directory: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate whose only subject name is a DNS name (no IP address)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return cert_path, key_path


# -- TLS modes


@pytest.mark.parametrize("tls", ["none", "starttls", "implicit"])
def test_delivers_in_each_tls_mode(start_sink: Callable[..., SmtpSink], tls: str) -> None:
    sink = start_sink(tls=tls)
    outcome = send(sink, message(recipients=("b@example.net", "c@example.org")))
    assert outcome == Outcome(DELIVERED, 250, "2.0.0 OK: queued")
    [received] = sink.messages
    assert received.mail_from == "a@example.com"
    assert received.rcpt_tos == ("b@example.net", "c@example.org")
    assert received.data == BODY
    assert received.tls is (tls != "none")
    assert received.ehlo_name  # an address literal or this machine's FQDN
    assert sink.connections == 1


def test_tls_none_never_upgrades_even_when_starttls_is_offered(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(tls="starttls", require_starttls=False)
    assert send(sink, smtp={"tls": "none"}).delivered
    assert sink.messages[0].tls is False


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_untrusted_certificate_defers(start_sink: Callable[..., SmtpSink], tls: str) -> None:
    """Without delivery.ca_file the self-signed certificate is not trusted: no delivery, try later."""
    sink = start_sink(tls=tls)
    config = sink.provider_config()
    outcome = smtp_client.send(target(config), message(), settings(ca_file=""))
    assert outcome.status is DEFERRED and outcome.code is None
    assert "certificate" in outcome.text and "self-signed" in outcome.text
    assert sink.messages == []


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
def test_certificate_is_checked_against_the_host_name_of_a_pinned_address(
    start_sink: Callable[..., SmtpSink], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tls: str
) -> None:
    """The connection goes to the address resolved once, but TLS verifies the provider's name."""
    cert = cert_for_name_only(tmp_path / "named", "mx.sink.test")
    sink = start_sink(tls=tls, cert=cert)
    looked_up = resolve_as(monkeypatch, "mx.sink.test", "127.0.0.1")

    by_name = send(sink, smtp={"host": "mx.sink.test"})
    assert by_name.delivered, by_name
    assert looked_up.count("mx.sink.test") == 1  # never resolved again after the check

    by_address = send(sink)  # host 127.0.0.1: the certificate does not name it
    assert by_address.status is DEFERRED
    assert "certificate" in by_address.text and "127.0.0.1" in by_address.text
    assert len(sink.messages) == 1


@pytest.mark.parametrize(
    ("server", "client"), [("none", "implicit"), ("implicit", "none"), ("implicit", "starttls")]
)
def test_mismatched_tls_modes_defer(start_sink: Callable[..., SmtpSink], server: str, client: str) -> None:
    """A provider configured with the wrong tls mode: the handshake or the greeting never comes."""
    sink = start_sink(tls=server)
    started = time.monotonic()
    outcome = send(sink, smtp={"tls": client}, send_timeout=0.3)
    assert time.monotonic() - started < 1.5
    assert outcome.status is DEFERRED and outcome.code is None
    assert sink.messages == []


def test_starttls_required_but_not_offered_defers(start_sink: Callable[..., SmtpSink], cert_pair) -> None:
    sink = start_sink(tls="none")
    outcome = send(sink, smtp={"tls": "starttls"}, ca_file=cert_pair[0])
    assert outcome.status is DEFERRED
    assert "does not offer STARTTLS" in outcome.text
    assert sink.messages == []


def test_next_address_is_tried_when_one_refuses_the_connection(
    start_sink: Callable[..., SmtpSink], monkeypatch: pytest.MonkeyPatch
) -> None:
    sink = start_sink()
    resolve_as(monkeypatch, "mx.sink.test", "127.0.0.2", "127.0.0.1")  # nothing listens on .2
    assert send(sink, smtp={"host": "mx.sink.test"}).delivered
    assert len(sink.messages) == 1


# -- AUTH


@pytest.mark.parametrize("tls", ["starttls", "implicit"])
@pytest.mark.parametrize("mechanism", ["PLAIN", "LOGIN"])
def test_auth_with_username_and_password(
    start_sink: Callable[..., SmtpSink], tls: str, mechanism: str
) -> None:
    sink = start_sink(tls=tls, auth={USER: PASSWORD}, auth_mechanisms=(mechanism,))
    outcome = send(sink, username=USER)
    assert outcome.delivered, outcome
    assert sink.messages[0].auth_user == USER


def test_sink_requires_auth_so_a_missing_username_fails(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(tls="starttls", auth={USER: PASSWORD})
    outcome = send(sink)
    assert outcome.status is FAILED and outcome.code == 530
    assert sink.messages == []


def test_wrong_password_fails_with_535_and_never_shows_the_password(
    start_sink: Callable[..., SmtpSink],
) -> None:
    sink = start_sink(tls="starttls", auth={USER: "the-right-one"})
    outcome = send(sink, username=USER, password=PASSWORD)
    assert outcome.status is FAILED and outcome.code == 535
    assert outcome.text.startswith("AUTH refused")
    assert PASSWORD not in outcome.text
    assert sink.messages == []


def test_username_with_tls_none_is_refused_before_connecting(start_sink: Callable[..., SmtpSink]) -> None:
    """The password is never sent in clear, even to a server that offers AUTH without TLS."""
    sink = start_sink(tls="none", auth={USER: PASSWORD})
    outcome = send(sink, username=USER)
    assert outcome.status is FAILED
    assert "without TLS" in outcome.text
    assert sink.connections == 0


def test_username_set_but_auth_not_offered_defers(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(tls="starttls")
    outcome = send(sink, username=USER)
    assert outcome.status is DEFERRED
    assert "does not offer AUTH" in outcome.text
    assert sink.messages == []


def test_non_ascii_password_fails_clearly(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(tls="implicit", auth={USER: "pässword"})
    outcome = send(sink, username=USER, password="pässword")
    assert outcome.status is FAILED and "not ASCII" in outcome.text
    assert "pässword" not in outcome.text


# -- the body, byte for byte


@pytest.mark.parametrize(
    ("data", "arrives"),
    [
        (BODY, BODY),
        (b".\r\n..\r\n.leading dot\r\n\r\n.\r\nend\r\n", b".\r\n..\r\n.leading dot\r\n\r\n.\r\nend\r\n"),
        (b".first line is a dot line\r\n", b".first line is a dot line\r\n"),
        ("Subject: é\r\n\r\nüñïçødé ✓\r\n".encode(), "Subject: é\r\n\r\nüñïçødé ✓\r\n".encode()),
        (
            b"x" * 998 + b"\r\n" + b"." + b"y" * 997 + b"\r\n",
            b"x" * 998 + b"\r\n" + b"." + b"y" * 997 + b"\r\n",
        ),
        (bytes(range(128, 256)) + b"\r\n", bytes(range(128, 256)) + b"\r\n"),
        # DATA ends only after a line break, so a message without a final CRLF gets one.
        (b"Subject: x\r\n\r\nno final line break", b"Subject: x\r\n\r\nno final line break\r\n"),
        (b"Subject: x\r\n\r\n.", b"Subject: x\r\n\r\n.\r\n"),
    ],
    ids=[
        "plain",
        "dot-lines",
        "dot-first",
        "utf8",
        "998-octet-lines",
        "all-high-octets",
        "no-crlf",
        "dot-no-crlf",
    ],
)
def test_body_arrives_intact(start_sink: Callable[..., SmtpSink], data: bytes, arrives: bytes) -> None:
    sink = start_sink(tls="starttls")
    assert send(sink, message(data)).delivered
    assert sink.messages[0].data == arrives


def test_large_body_arrives_intact(start_sink: Callable[..., SmtpSink]) -> None:
    """Several write chunks, with dot lines at the chunk edges."""
    line = b"." + b"z" * 76 + b"\r\n"
    data = line * (3 * smtp_client.CHUNK // len(line) + 7)
    sink = start_sink()
    assert send(sink, message(data)).delivered
    assert sink.messages[0].data == data


def test_bare_line_breaks_become_crlf_so_no_end_of_data_can_be_smuggled(
    start_sink: Callable[..., SmtpSink],
) -> None:
    """A bare LF before ".\\r\\n" would end DATA early on a lenient server; on the wire it is a dot line."""
    smuggled = b"Subject: x\r\n\r\nhi\n.\r\nMAIL FROM:<evil@example.com>\r\nlone\rcr\r\n"
    sink = start_sink()
    assert send(sink, message(smuggled)).delivered
    [received] = sink.messages
    assert received.data == b"Subject: x\r\n\r\nhi\r\n.\r\nMAIL FROM:<evil@example.com>\r\nlone\r\ncr\r\n"


def test_null_sender_goes_out_as_empty_path(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    assert send(sink, message(sender="")).delivered
    assert sink.messages[0].mail_from == ""


# -- ESMTP parameters


def test_8bit_body_is_declared_when_8bitmime_is_offered(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    data = "Subject: ü\r\n\r\nü\r\n".encode()
    assert send(sink, message(data)).delivered
    assert sink.messages[0].mail_options == ("BODY=8BITMIME", f"SIZE={len(data)}")


def test_ascii_body_has_no_body_parameter(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    assert send(sink).delivered
    assert sink.messages[0].mail_options == (f"SIZE={len(BODY)}",)


def test_without_8bitmime_and_size_the_body_goes_as_it_is(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(hide={"8BITMIME", "SIZE"})
    data = "Subject: ü\r\n\r\nü\r\n".encode()
    assert send(sink, message(data)).delivered
    assert sink.messages[0].mail_options == ()
    assert sink.messages[0].data == data


def test_size_counts_the_crlf_that_is_added(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    assert send(sink, message(b"no line break")).delivered
    assert sink.messages[0].mail_options == ("SIZE=15",)


def test_non_ascii_address_uses_smtputf8(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    outcome = send(sink, message(sender="jörg@exämple.de", recipients=("用户@例子.广告", "b@example.net")))
    assert outcome.delivered, outcome
    [received] = sink.messages
    assert "SMTPUTF8" in received.mail_options
    assert received.mail_from == "jörg@exämple.de"
    assert received.rcpt_tos == ("用户@例子.广告", "b@example.net")


def test_non_ascii_address_fails_when_smtputf8_is_not_offered(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink(smtputf8=False)
    outcome = send(sink, message(recipients=("jörg@example.de",)))
    assert outcome.status is FAILED and "SMTPUTF8" in outcome.text
    assert sink.messages == []


def test_address_that_could_inject_parameters_fails_without_connecting(
    start_sink: Callable[..., SmtpSink],
) -> None:
    sink = start_sink()
    outcome = send(sink, message(recipients=("b@example.net> NOTIFY=NEVER",)))
    assert outcome.status is FAILED and "unusable envelope address" in outcome.text
    assert sink.connections == 0


# -- refusals


@pytest.mark.parametrize(("code", "status"), [(451, DEFERRED), (550, FAILED)])
def test_rcpt_refusal(start_sink: Callable[..., SmtpSink], code: int, status: DeliveryStatus) -> None:
    sink = start_sink()
    sink.reply_to_rcpt(code, f"{code // 100}.1.1 not now or never")
    outcome = send(sink)
    assert outcome.status is status and outcome.code == code
    assert "RCPT TO refused" in outcome.text and "<b@example.net>" in outcome.text
    assert sink.messages == []


def test_all_recipients_refused_with_one_temporary_defers(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    sink.refuse("b@example.net", 550, "5.1.1 unknown")
    sink.refuse("c@example.net", 452, "4.2.2 mailbox full")
    outcome = send(sink, message(recipients=("b@example.net", "c@example.net")))
    assert outcome.status is DEFERRED and outcome.code == 452
    assert sink.messages == []


def test_some_recipients_refused_delivers_to_the_rest_and_names_the_refused(
    start_sink: Callable[..., SmtpSink],
) -> None:
    sink = start_sink()
    sink.refuse("gone@example.net", 550, "5.1.1 no such user")
    sink.refuse("later@example.net", 450, "4.2.1 try later")
    outcome = send(sink, message(recipients=("b@example.net", "gone@example.net", "later@example.net")))
    assert outcome.status is DELIVERED and outcome.code == 250
    assert "2 of 3 refused" in outcome.text
    assert "<gone@example.net> 550 5.1.1 no such user" in outcome.text
    assert "<later@example.net> 450 4.2.1 try later" in outcome.text
    assert sink.messages[0].rcpt_tos == ("b@example.net",)


@pytest.mark.parametrize(("code", "status"), [(452, DEFERRED), (554, FAILED)])
def test_refusal_after_the_data(
    start_sink: Callable[..., SmtpSink], code: int, status: DeliveryStatus
) -> None:
    sink = start_sink()
    sink.reply_to_data(code, "x.0.0 content refused")
    outcome = send(sink)
    assert outcome.status is status and outcome.code == code
    assert outcome.text == "end of DATA refused: x.0.0 content refused"


@pytest.mark.parametrize(("code", "status"), [(451, DEFERRED), (554, FAILED)])
def test_refusal_of_the_data_command(
    start_sink: Callable[..., SmtpSink], code: int, status: DeliveryStatus
) -> None:
    sink = start_sink()
    sink.reply_to_data_command(code, "no data for you")
    outcome = send(sink)
    assert outcome.status is status and outcome.code == code
    assert outcome.text == "DATA refused: no data for you"
    assert sink.messages == []


@pytest.mark.parametrize(("code", "status"), [(421, DEFERRED), (553, FAILED)])
def test_refusal_of_the_sender(
    start_sink: Callable[..., SmtpSink], code: int, status: DeliveryStatus
) -> None:
    sink = start_sink()
    sink.reply_to_mail(code, "sender refused")
    outcome = send(sink)
    assert outcome.status is status and outcome.code == code
    assert outcome.text == "MAIL FROM refused: sender refused"


def test_one_shot_reply_then_normal_service(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    sink.queue_reply("DATA", 451, "4.3.0 busy")
    assert send(sink).status is DEFERRED
    assert send(sink).delivered
    assert len(sink.messages) == 1


# -- network failures


def test_connection_refused_defers() -> None:
    port = closed_port()
    config = {"host": "127.0.0.1", "port": port, "tls": "none"}
    started = time.monotonic()
    outcome = smtp_client.send(target(config), message(), settings())
    assert time.monotonic() - started < 1.5  # no wait for connect_timeout
    assert outcome.status is DEFERRED and outcome.code is None
    assert outcome.text == f"could not connect to 127.0.0.1:{port}"


def test_slow_data_reply_defers_after_send_timeout(start_sink: Callable[..., SmtpSink]) -> None:
    sink = start_sink()
    sink.delay_data(5.0)
    started = time.monotonic()
    outcome = send(sink, send_timeout=0.5)
    elapsed = time.monotonic() - started
    assert outcome.status is DEFERRED and outcome.code is None
    assert "end of DATA" in outcome.text and "timed out" in outcome.text
    assert 0.5 <= elapsed < 2.5  # not the sink's 5 s


class ScriptedServer:
    """A one-connection server whose side of the talk is ``behave(connection)``, for replies aiosmtpd
    will not send: odd greetings, replies that never end. ``cert``: implicit TLS."""

    def __init__(
        self, behave: Callable[[socket.socket], None], cert: tuple[Path, Path] | None = None
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.behave = behave
        self.tls: ssl.SSLContext | None = None
        if cert is not None:
            self.tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self.tls.load_cert_chain(str(cert[0]), str(cert[1]))
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        connection, _ = self.listener.accept()
        try:
            if self.tls is not None:
                connection = self.tls.wrap_socket(connection, server_side=True)
            self.behave(connection)
        except OSError:
            pass  # the client cut the connection: what the tests want
        finally:
            connection.close()  # the TLS socket when wrapped: wrapping detaches the plain one

    def close(self) -> None:
        self.thread.join(10.0)
        self.listener.close()


def greeted(connection: socket.socket) -> None:
    """A normal greeting, and the client's EHLO read."""
    connection.sendall(b"220 hostile.example ESMTP\r\n")
    connection.recv(4096)


@pytest.mark.parametrize(
    ("script", "code", "text"),
    [
        (b"554 5.7.1 no service for you\r\n", 554, "greeting refused: 554 5.7.1 no service for you"),
        (b"421 4.3.2 shutting down\r\n", 421, "greeting refused: 421 4.3.2 shutting down"),
        (b"", None, "lost during greeting"),
    ],
)
def test_greeting_problems_defer(script: bytes, code: int | None, text: str) -> None:
    """A refusal before MAIL says nothing about the message, so even a 554 greeting defers."""

    def greet(connection: socket.socket) -> None:
        if script:  # an empty script: hang up right after accepting
            connection.sendall(script)
            connection.settimeout(2.0)
            connection.recv(4096)  # the client's next command (QUIT): hang up on it

    server = ScriptedServer(greet)
    try:
        config = {"host": "127.0.0.1", "port": server.port, "tls": "none"}
        outcome = smtp_client.send(target(config), message(), settings())
    finally:
        server.close()
    assert outcome.status is DEFERRED and outcome.code == code
    assert text in outcome.text


def trickle(connection: socket.socket) -> None:
    """One continuation line every 0.2 s until the client hangs up: never a whole reply."""
    greeted(connection)
    while True:
        connection.sendall(b"250-still thinking\r\n")
        # The pace is the behaviour under test; a hang-up (or QUIT) ends it at once.
        readable, _, _ = select.select([connection], [], [], 0.2)
        if readable:
            return


@pytest.mark.parametrize("tls", ["none", "implicit"])
def test_a_reply_trickled_forever_is_cut_at_the_attempts_deadline(
    tls: str, cert_pair: tuple[Path, Path]
) -> None:
    """A line every 0.2 s never trips a 1 s socket timeout; the whole attempt's deadline does."""
    hostile = ScriptedServer(trickle, cert=cert_pair if tls == "implicit" else None)
    try:
        config = {"host": "127.0.0.1", "port": hostile.port, "tls": tls}
        started = time.monotonic()
        outcome = smtp_client.send(
            target(config),
            message(),
            settings(ca_file=cert_pair[0], connect_timeout=0.5, send_timeout=1.0),
        )
        elapsed = time.monotonic() - started
    finally:
        hostile.close()
    assert outcome.status is DEFERRED and outcome.code is None
    assert outcome.text == (
        f"gave up during EHLO with 127.0.0.1:{hostile.port}: the attempt took 1.5s"
        " (connect_timeout + send_timeout)"
    )
    assert 1.5 <= elapsed < 3.0
    assert hostile.thread.is_alive() is False


def test_the_workers_deadline_cuts_the_attempt_sooner() -> None:
    """What is left of the message's attempt budget bounds the attempt, whatever the timeouts."""
    hostile = ScriptedServer(trickle)
    try:
        config = {"host": "127.0.0.1", "port": hostile.port, "tls": "none"}
        started = time.monotonic()
        outcome = smtp_client.send(
            target(config), message(), settings(connect_timeout=1.0, send_timeout=5.0), started + 0.6
        )
        elapsed = time.monotonic() - started
    finally:
        hostile.close()
    assert outcome.status is DEFERRED
    assert outcome.text.endswith("(the rest of the attempt budget)") and "during EHLO" in outcome.text
    assert 0.5 <= elapsed < 1.5


def test_an_endless_reply_is_cut_at_64_kib() -> None:
    """smtplib caps a line, not the number of lines: without a cap this fills the worker's memory."""

    def flood(connection: socket.socket) -> None:
        greeted(connection)
        line = b"250-" + b"x" * 1000 + b"\r\n"
        while True:  # until the client hangs up
            connection.sendall(line * 64)

    hostile = ScriptedServer(flood)
    try:
        config = {"host": "127.0.0.1", "port": hostile.port, "tls": "none"}
        started = time.monotonic()
        outcome = smtp_client.send(target(config), message(), settings(send_timeout=30.0))
        elapsed = time.monotonic() - started
    finally:
        hostile.close()
    assert outcome.status is DEFERRED
    assert "lost during EHLO" in outcome.text and "reply longer than 64 KiB" in outcome.text
    assert elapsed < 5.0


def test_a_long_but_finite_reply_is_still_read() -> None:
    """The cap is per reply: a chatty but honest EHLO (many extensions) is fine."""

    def chatty(connection: socket.socket) -> None:
        greeted(connection)
        connection.sendall(b"".join(b"250-X-EXT%d\r\n" % n for n in range(500)) + b"250 SIZE 1000\r\n")
        connection.recv(4096)  # MAIL
        connection.sendall(b"421 4.3.2 closing now\r\n")

    hostile = ScriptedServer(chatty)
    try:
        config = {"host": "127.0.0.1", "port": hostile.port, "tls": "none"}
        outcome = smtp_client.send(target(config), message(), settings())
    finally:
        hostile.close()
    assert outcome == Outcome(DEFERRED, 421, "MAIL FROM refused: 4.3.2 closing now")


# -- the private-network guard


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost"])
def test_private_host_is_refused_without_connecting(start_sink: Callable[..., SmtpSink], host: str) -> None:
    sink = start_sink()
    outcome = send(sink, smtp={"host": host}, allow_private=False)
    assert outcome == Outcome(DEFERRED, None, f"could not connect to {host}:{sink.port}")
    assert sink.connections == 0


def test_unresolvable_host_defers(monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(*args: object, **kwargs: object) -> list[object]:
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(network.socket, "getaddrinfo", fail)
    config = {"host": "mx.example", "port": 25, "tls": "none"}
    outcome = smtp_client.send(target(config), message(), settings())
    assert outcome == Outcome(DEFERRED, None, "could not connect to mx.example:25")


def test_every_failure_to_connect_reads_the_same_to_the_tenant(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Unresolvable, private, refused and timed out: one text and one status; the operator's log tells."""
    full = socket.create_server(("127.0.0.1", 0), backlog=0)  # a full backlog: connects time out
    filler = socket.create_connection(full.getsockname())
    refused, timing_out = closed_port(), full.getsockname()[1]
    resolve_as(monkeypatch, "private.example", "10.1.2.3")
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host == "nowhere.example":
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(network.socket, "getaddrinfo", getaddrinfo)
    cases = [("nowhere.example", 25, True), ("private.example", 25, False)]
    cases += [("127.0.0.1", refused, True), ("127.0.0.1", timing_out, True)]
    try:
        with caplog.at_level("WARNING", logger="smtp_proxy.delivery"):
            outcomes = [
                smtp_client.send(
                    target({"host": host, "port": port, "tls": "none"}),
                    message(),
                    settings(allow_private=allowed, connect_timeout=0.5),
                )
                for host, port, allowed in cases
            ]
    finally:
        filler.close()
        full.close()
    assert outcomes == [
        Outcome(DEFERRED, None, f"could not connect to {host}:{port}") for host, port, _ in cases
    ]
    details = [
        (r.__dict__.get("event"), r.__dict__.get("error"), r.__dict__.get("address")) for r in caplog.records
    ]
    assert details == [
        ("delivery.connect_failed", "ResolutionError", None),
        ("delivery.private_address_refused", None, "10.1.2.3"),
        ("delivery.connect_failed", "ConnectionRefusedError", "127.0.0.1"),
        ("delivery.connect_failed", "TimeoutError", "127.0.0.1"),
    ]


def test_unreadable_ca_file_defers(start_sink: Callable[..., SmtpSink], tmp_path: Path) -> None:
    sink = start_sink(tls="implicit")
    outcome = send(sink, ca_file=tmp_path / "missing.pem")
    assert outcome.status is DEFERRED and outcome.text.startswith("cannot load delivery.ca_file")
    assert sink.connections == 0


# -- secrets and resources


def test_password_never_appears_in_an_outcome(start_sink: Callable[..., SmtpSink]) -> None:
    """Even a server that echoes the password back gets it masked."""
    sink = start_sink(tls="starttls", auth={USER: PASSWORD})
    sink.reply_to_mail(550, f"5.7.1 we do not like {PASSWORD}")
    refused = send(sink, username=USER)
    sink.reply_to_mail(None)
    sink.queue_reply("RCPT", 550, f"5.1.1 unknown {PASSWORD}")
    sink.queue_reply("RCPT", 451, f"4.0.0 later {PASSWORD}")
    partial = send(
        sink, message(recipients=("x@example.net", "y@example.net", "b@example.net")), username=USER
    )
    sink.delay_data(5.0)
    timed_out = send(sink, username=USER, send_timeout=0.2)
    wrong = send(sink, username=USER, password=PASSWORD + "-wrong")
    outcomes = [refused, partial, timed_out, wrong]
    assert [o.status for o in outcomes] == [FAILED, DELIVERED, DEFERRED, FAILED]
    assert "we do not like ********" in refused.text
    for outcome in outcomes:
        assert PASSWORD not in outcome.text


def test_no_socket_is_left_open(start_sink: Callable[..., SmtpSink], cert_pair: tuple[Path, Path]) -> None:
    """Every path closes its socket: an unclosed one would warn when it is collected."""
    plain, secure = start_sink(), start_sink(tls="starttls")
    secure.reply_to_data(554, "refused")
    closed = {"host": "127.0.0.1", "port": closed_port(), "tls": "none"}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        outcomes = [send(plain), send(secure)]
        outcomes.append(
            smtp_client.send(target(secure.provider_config()), message(), settings())
        )  # untrusted
        plain.delay_data(5.0)
        outcomes.append(send(plain, send_timeout=0.2))
        outcomes.append(smtp_client.send(target(closed), message(), settings()))
        gc.collect()
    assert [o.status for o in outcomes] == [DELIVERED, FAILED, DEFERRED, DEFERRED, DEFERRED]
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []
