"""SmtpSession under generated clients: any byte stream, cut anywhere, gives one result.

A hypothesis state machine writes the client's side of sessions as flights, the bytes a
client sends before it waits: EHLO/HELO, STARTTLS (with commands smuggled behind it), AUTH
exchanges with good and bad credentials, MAIL/RCPT with parameters, DATA bodies full of
framing traps (dot-stuffing, bare LF and CR, ``\\n.\\n``, a real terminator in mid-chunk,
long lines), RSET/NOOP/VRFY/QUIT, garbage, overlong lines and pipelined groups of all these.
When a session ends (QUIT, a closing reply, a failed handshake) the script goes on in a new
connection.

Four fresh cores read the same flights, each cut its own way: one receive per flight, one
byte per receive, random cuts, and one receive for everything up to the next TLS handshake.
A harness answers their events as the socket adapter does (``server.py``'s ``_send`` and
``_resolve``), from fixed tables, so the four must agree on every output. Beside agreement:
no exception; one verdict right after every 354 and none elsewhere; each message ends at the
first CRLF "." CRLF after its 354 and holds what the documented rules say (the byte-by-byte
core knows which bytes it was framed from), so one DATA never gives two messages; replies
are well formed, with enhanced codes wherever the protocol uses them; nothing follows a
closing reply; no DATA budget stays held outside DATA.

The one cut a client cannot move is the TLS handshake: what it sends behind STARTTLS before
the handshake never reaches the session (the core drops what it holds, CVE-2011-0411; later
bytes would meet the TLS layer). So a flight holding STARTTLS ends a run, no cut crosses a
run, and the harness drops the rest of a run once its TLS starts, as the core must.

The default run spends a few fixed (derandomized) seconds; ``./scripts/test -m fuzz`` runs
at least a million random steps (flights) and prints its figures (shown with ``-rP``).
"""

from __future__ import annotations

import base64
import functools
import multiprocessing
import random
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import pytest
from hypothesis import HealthCheck, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule, run_state_machine_as_test

from smtp_proxy.smtp import protocol
from smtp_proxy.smtp import replies as R
from smtp_proxy.smtp.budget import InFlightBudget
from smtp_proxy.smtp.protocol import (
    AuthOutcome,
    CredentialsOffered,
    MailFromOffered,
    MessageReceived,
    MessageRejected,
    Output,
    SessionPolicy,
    SmtpSession,
    State,
    TlsRequested,
)
from smtp_proxy.smtp.replies import Reply
from tests.unit.smtp.conftest import HOSTNAME, FakeAccount, plain_response
from tests.unit.smtp.test_protocol_data import reference_outcome

CRLF = b"\r\n"
FUZZ_STEPS = 1_000_000
FUZZ_PROCESSES = 2
# Data lines longer than this are read in pieces; lowered so that the byte-by-byte core
# reaches that path in few receives (the framing rules do not depend on the figure).
PENDING_DATA = 64

# --- the adapter's answers, as fixed tables --------------------------------------------------------

ACCOUNTS = {
    "alice": FakeAccount("alice", ("example.com",), header_from_check=True),
    "bob": FakeAccount("bob", ("example.com", "*.example.org"), header_from_check=False),
}
PASSWORD = "secret"
# User names that stand for the adapter's other verdicts on a login.
AUTH_OUTCOMES = {
    "down": AuthOutcome.TEMPORARY,
    "slow": AuthOutcome.THROTTLED,
    "busy": AuthOutcome.TOO_MANY_SESSIONS,
}
# Sender local parts that stand for the account policy's verdicts on MAIL FROM.
MAIL_REFUSALS = {
    "rate": R.rate_exceeded(60),
    "disabled": R.R421_ACCOUNT_DISABLED,
    "storage": R.R451_STORAGE_DOWN,
}
ONE_RECIPIENT_LEFT = "few"
DEFER_MARK = b"X-Defer"  # a message holding this fails to store (451)

EVENTS = (TlsRequested, CredentialsOffered, MailFromOffered, MessageReceived)
# Replies without an enhanced code: RFC 2034 leaves EHLO/HELO, 354 and SASL challenges alone.
UNCODED = frozenset({250, 334, 354})
ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")
VERDICTS = (MessageReceived, MessageRejected)

# Milestones reached, so that a run shows (and the tests assert) that the steps went deep.
CENSUS: Counter[str] = Counter()


@dataclass(frozen=True, order=True)
class Flight:
    """Bytes a client sends before it waits; ``handshake_ok`` answers a STARTTLS among them."""

    data: bytes
    handshake_ok: bool = True

    @property
    def ends_run(self) -> bool:
        return b"STARTTLS" in self.data.upper()


class Client:
    """One core and the adapter's answers to its events; ``outputs`` holds all it produced."""

    def __init__(self, policy: SessionPolicy, budget_limit: int | None) -> None:
        self.budget = InFlightBudget(budget_limit) if budget_limit else None
        self.session = SmtpSession(policy, self.budget)
        self.outputs: list[Output] = []
        self.queued = 0
        self.gone = False  # the adapter ended the connection

    def feed(self, pieces: Iterable[bytes], handshake_ok: bool) -> None:
        """Receive ``pieces`` in order; the ones after a TLS request were sent before the handshake."""
        for piece in pieces:
            if self.gone or self._deliver(self.session.receive(piece), handshake_ok):
                return

    def _deliver(self, outputs: list[Output], handshake_ok: bool) -> bool:
        """Answer events the way ``server.py``'s ``_send`` does; True once a TLS handshake ran."""
        handshake = False
        while outputs:
            self.outputs.extend(outputs)
            *rest, last = outputs
            assert not any(isinstance(item, EVENTS) for item in rest), "an event must pause the session"
            if any(isinstance(item, Reply) and item.close for item in outputs):
                assert self.session.closed and not isinstance(last, EVENTS)
                self.gone = True
            if not isinstance(last, EVENTS):
                break
            if isinstance(last, TlsRequested):
                handshake = True
                if not handshake_ok:
                    self.gone = True  # server.py drops the connection after a failed handshake
                    self.session.abandon()
                    break
            outputs = self._answer(last)
        return handshake

    def _answer(self, event: Output) -> list[Output]:
        session = self.session
        if isinstance(event, TlsRequested):
            return session.tls_started()
        if isinstance(event, CredentialsOffered):
            account = ACCOUNTS.get(event.username)
            if account is not None and event.password == PASSWORD:
                return session.credentials_checked(AuthOutcome.OK, account)
            return session.credentials_checked(AUTH_OUTCOMES.get(event.username, AuthOutcome.INVALID))
        if isinstance(event, MailFromOffered):
            local = event.sender.partition("@")[0]
            if local == ONE_RECIPIENT_LEFT:
                return session.mail_checked(recipients_left=1, recipients_refusal=R.R452_TOO_MANY_RECIPIENTS)
            return session.mail_checked(MAIL_REFUSALS.get(local))
        assert isinstance(event, MessageReceived)
        if self.budget is not None:
            self.budget.give(event.held)
        if DEFER_MARK in event.data:
            return session.message_deferred()
        self.queued += 1
        return session.message_queued(f"Q{self.queued}")

    def check_budget(self) -> None:
        """Outside DATA every byte taken from the budget is given back."""
        if self.budget is not None and self.session.state is not State.DATA:
            assert self.budget.held == 0, (self.session.state, self.budget.held)


class BytewiseClient(Client):
    """A client fed one byte per receive, so it knows the bytes each message was framed from."""

    def __init__(self, policy: SessionPolicy, budget_limit: int | None) -> None:
        super().__init__(policy, budget_limit)
        self.limit = policy.max_message_size
        self.stream: bytearray | None = None  # the bytes since the last 354

    def feed_bytes(self, data: bytes, handshake_ok: bool) -> None:
        receive = self.session.receive
        for position in range(len(data)):
            if self.gone:
                return
            if self.stream is not None:
                self.stream.append(data[position])
            outputs = receive(data[position : position + 1])
            if not outputs:  # most bytes: kept for a line to complete
                continue
            seen = len(self.outputs)
            handshake = self._deliver(outputs, handshake_ok)
            for item in self.outputs[seen:]:
                if isinstance(item, VERDICTS):
                    assert self.stream is not None
                    check_framing(bytes(self.stream), item, self.limit)
                    self.stream = None
                elif isinstance(item, Reply) and item.code == 354:
                    self.stream = bytearray()
            if handshake:
                return


# --- checks on one output sequence ---------------------------------------------------------------


def check_reply(reply: Reply) -> None:
    code = str(reply.code)
    assert len(code) == 3 and code[0] in "2345", reply
    if reply.status is None:
        assert reply.code in UNCODED, reply
        if reply.code == 250:
            assert reply.lines[0] == HOSTNAME, reply  # EHLO/HELO only
    else:
        assert ENHANCED.fullmatch(reply.status) and reply.status[0] == code[0], reply
    assert reply.lines, reply
    for line in reply.lines:
        assert line.isascii() and "\r" not in line and "\n" not in line, reply
    assert reply.to_bytes().count(b"\r\n") == len(reply.lines)


def check_framing(stream: bytes, verdict: MessageReceived | MessageRejected, limit: int) -> None:
    """A message ends at the first CRLF "." CRLF after its 354, and holds what the rules say.

    ``stream`` runs from the byte after the DATA line to the byte that brought the verdict.
    """
    assert (CRLF + stream).find(b"\r\n.\r\n") == len(stream) - 3, stream
    reason, data = reference_outcome(stream, limit)
    if isinstance(verdict, MessageReceived):
        assert (reason, verdict.data) == ("ok", data), stream
    elif reason != "ok":
        assert verdict.reason == reason, (verdict, stream)
    else:  # verdicts the reference does not know: the budget, and the From: header
        assert verdict.reason in ("server_busy", "header_from"), (verdict, stream)


def check_outputs(outputs: Sequence[Output]) -> None:
    """Each 354 is followed by exactly one verdict, each verdict by its reply; nothing after a close."""
    for index, item in enumerate(outputs):
        following = outputs[index + 1] if index + 1 < len(outputs) else None
        if isinstance(item, Reply):
            check_reply(item)
            if item.close:
                assert following is None, outputs[index:]
                CENSUS[f"closed {item.code}"] += 1
            elif item.code == 354:
                CENSUS["354"] += 1
                assert following is None or isinstance(following, VERDICTS), outputs[index:]
            continue
        if isinstance(item, VERDICTS):
            previous = outputs[index - 1] if index else None
            assert isinstance(previous, Reply) and previous.code == 354, outputs[index - 1 :]
        if isinstance(item, MessageReceived):
            CENSUS["received"] += 1
            assert following is None or (isinstance(following, Reply) and following.code in (250, 451))
        elif isinstance(item, MessageRejected):
            CENSUS[f"rejected {item.reason}"] += 1
            assert following is None or following == item.reply
        elif isinstance(item, TlsRequested):
            CENSUS["tls"] += 1
        elif isinstance(item, CredentialsOffered):
            CENSUS["credentials"] += 1
        elif isinstance(item, MailFromOffered):
            CENSUS["mail"] += 1


# --- what the client sends -----------------------------------------------------------------------
# The grammar below makes parts (a few flights: a command, an AUTH exchange, a transaction),
# and scenes of a few parts fill a pool built once. Hypothesis picks scenes by index: one
# draw per scene, as drawing every detail costs many times more than the four cores reading
# it. The pool is sorted shortest first, so a failing script shrinks to few, short scenes.


def b64(text: str) -> bytes:
    return base64.b64encode(text.encode())


def plain(user: str, password: str) -> bytes:
    return plain_response(user, password).encode("ascii")


ENDINGS = [CRLF, CRLF, CRLF, CRLF, b"\n", b"\r", b""]
GREETINGS = [
    b"EHLO client.test",
    b"EHLO client.test",
    b"HELO client.test",
    b"ehlo x",
    b"EHLO",
    b"HELO a b",
    b"EHLO " + b"h" * 256,
]
# QUIT ends the connection: a rare part kind of its own, so that sessions live long enough to go deep.
SIMPLE = [b"RSET", b"NOOP", b"NOOP x", b"RSET x", b"VRFY bob", b"VRFY", b"HELP", b"EXPN list", b"ETRN"]
USERS = ["alice", "bob", "down", "slow", "busy", "mallory", ""]
PASSWORDS = [PASSWORD, PASSWORD, "wrong", ""]
SENDERS = [
    b"alice@example.com",
    b"alice@example.com",
    b"few@example.com",
    b"rate@example.com",
    b"disabled@example.com",
    b"storage@example.com",
    b"x@sub.example.org",
    b"x@evil.test",
    b"",
    b"no-at",
    b"a b@example.com",
]
MAIL_VERBS = [b"MAIL FROM:", b"MAIL FROM:", b"mail from: ", b"MAIL TO:", b"MAIL"]
MAIL_PARAMS = [
    *(b"", b"", b" SIZE=100", b" SIZE=99999999", b" SIZE=x", b" BODY=8BITMIME", b" FOO=1", b" SIZE"),
    *(b" RET=HDRS ENVID=a+2Bb", b" RET=ALL", b" ENVID=a+0D+0Ab", b" RET=FULL RET=FULL"),
]
RECIPIENTS = [
    b"bob@dest.test",
    b"bob@dest.test",
    b"carol@dest.test",
    b"postmaster",
    b"",
    b"no-at",
    b"a@[127.0.0.1]",
]
RCPT_VERBS = [b"RCPT TO:", b"RCPT TO:", b"rcpt to: ", b"RCPT FROM:"]
RCPT_PARAMS = [
    *(b"", b"", b"", b" NOTIFY=NEVER", b" NOTIFY=FAILURE,DELAY ORCPT=rfc822;bob+40dest.test"),
    *(b" NOTIFY=NEVER,FAILURE", b" ORCPT=x400;bob", b" ORCPT=rfc822;+0A"),
]
BODY_TOKENS = [
    b"Subject: hi\r\n",
    b"a line\r\n",
    b"a line\r\n",
    b"From: <alice@example.com>\r\n",
    b"From: x@evil.test\r\n",
    b"\r\n",
    b"\r\n",
    b"text",
    b".",
    b"..",
    b"\n",
    b"\r\n.",
    b".\r\n",
    b"\n.\n",
    b"\n.\r\n",
    b"\r\n.\n",
    b"\r\n.\r\n",  # a real end of data, with whatever follows read as commands
    b"\xff\x00",
    DEFER_MARK,
    b"L" * (PENDING_DATA + 40),
    b"." + b"M" * (PENDING_DATA * 2),
]
BARE_CR = [b"\r", b"\r.\r", b"x\ry"]
TERMINATORS = [b"\r\n.\r\n", b"\r\n.\r\n", b".\r\n", b"\n.\n", b"\r.\r", b"\n.\r\n", b"\r\n.\n"]
LONG_LINES = [
    b"GET / HTTP/1.1",
    b"X" * 511,
    b"X" * 513,
    b"AUTH PLAIN " + b"A" * 4090,
    b"AUTH PLAIN " + b"A" * 4200,
    b"NOOP " + b"N" * 4200,
]
GARBAGE_BYTES = b"\r\n.:<>@ AUTHMLDaz09=\x00\xff"
SMUGGLED = [
    b"",
    b"",
    b"EHLO evil\r\n",
    b"AUTH PLAIN " + plain("alice", PASSWORD) + CRLF,
    b"MAIL FROM:<a@example.com>\r\n",
    b"NOOP",
]


def lines(parts: Iterable[bytes], ending: bytes = CRLF) -> bytes:
    return b"".join(part + ending for part in parts)


def one(data: bytes) -> tuple[Flight, ...]:
    return (Flight(data),)


def login(user: str, pipelined: bool) -> tuple[Flight, ...]:
    """The well-behaved way to a session that may send: EHLO, STARTTLS, EHLO, AUTH."""
    auth = Flight(b"EHLO client.test\r\nAUTH PLAIN " + plain(user, PASSWORD) + CRLF)
    if pipelined:
        return (Flight(b"EHLO client.test\r\nSTARTTLS\r\n"), auth)
    return (Flight(b"EHLO client.test\r\n"), Flight(b"STARTTLS\r\n"), auth)


def auth_lines(rng: random.Random) -> list[bytes]:
    """An AUTH exchange, whole or cut short: the command and the client's responses."""
    user, password = rng.choice(USERS), rng.choice(PASSWORDS)
    form = rng.randrange(8)
    if form == 0:
        return [b"AUTH PLAIN " + plain(user, password)]
    if form == 1:
        return [b"AUTH PLAIN", plain(user, password)]
    if form == 2:
        return [b"AUTH LOGIN " + b64(user), b64(password)]
    if form == 3:
        return [b"AUTH LOGIN", b64(user), b64(password)]
    if form == 4:
        return [rng.choice([b"AUTH PLAIN", b"AUTH LOGIN"]), b"*"]  # cancelled
    if form == 5:
        return [rng.choice([b"AUTH PLAIN", b"AUTH LOGIN", b"AUTH LOGIN " + b64(user)]), b"!!not base64"]
    if form == 6:
        return [rng.choice([b"AUTH", b"AUTH CRAM-MD5", b"AUTH PLAIN =", b"AUTH LOGIN ="])]
    return [b"AUTH PLAIN " + base64.b64encode(b"other\x00" + user.encode() + b"\x00" + password.encode())]


def mail_line(rng: random.Random) -> bytes:
    return rng.choice(MAIL_VERBS) + b"<" + rng.choice(SENDERS) + b">" + rng.choice(MAIL_PARAMS)


def rcpt_line(rng: random.Random) -> bytes:
    return rng.choice(RCPT_VERBS) + b"<" + rng.choice(RECIPIENTS) + b">" + rng.choice(RCPT_PARAMS)


def body(rng: random.Random) -> bytes:
    tokens = rng.choices(BODY_TOKENS, k=rng.randrange(13))
    if rng.random() < 0.2:
        tokens.insert(rng.randint(0, len(tokens)), rng.choice(BARE_CR))
    return b"".join(tokens)


def garbage(rng: random.Random) -> bytes:
    if rng.random() < 0.04:  # rare: a client reads them a byte at a time
        return rng.choice(LONG_LINES)
    if rng.random() < 0.5:
        return rng.randbytes(rng.randrange(25))
    return bytes(rng.choices(GARBAGE_BYTES, k=rng.randrange(25)))


def command(rng: random.Random) -> bytes:
    """One command line, without its line ending, for pipelined groups."""
    kind = rng.randrange(6)
    if kind == 0:
        return rng.choice(GREETINGS)
    if kind == 1:
        return rng.choice(SIMPLE)
    if kind == 2:
        return mail_line(rng)
    if kind == 3:
        return rcpt_line(rng)
    if kind == 4:
        return b"DATA"
    return garbage(rng)


def starttls(rng: random.Random) -> tuple[Flight, ...]:
    before = rng.choice([b"", b"EHLO client.test\r\n"])
    argument = rng.choice([b"", b"", b"", b" now"])
    handshake_ok = rng.random() < 0.8
    return (Flight(before + b"STARTTLS" + argument + CRLF + rng.choice(SMUGGLED), handshake_ok),)


def authentication(rng: random.Random) -> tuple[Flight, ...]:
    """An AUTH exchange, pipelined in one flight or a flight per line."""
    exchange, ending = auth_lines(rng), rng.choice(ENDINGS)
    if rng.random() < 0.5:
        return one(lines(exchange, ending))
    return tuple(Flight(line + ending) for line in exchange)


def transaction(rng: random.Random) -> tuple[Flight, ...]:
    """MAIL, RCPT, DATA, a body and an end of data (perhaps not a real one), and perhaps more."""
    sender = rng.choice([b"alice@example.com", b"few@example.com"])
    recipients = rng.choices([b"bob@dest.test", b"carol@dest.test"], k=rng.randint(1, 3))
    commands = lines(
        [b"MAIL FROM:<" + sender + b">", *(b"RCPT TO:<" + r + b">" for r in recipients), b"DATA"]
    )
    after = rng.choice([b"", b"", b"RSET\r\n", b"NOOP\r\n", b"MAIL FROM:<alice@example.com>\r\n"])
    content = body(rng) + rng.choice(TERMINATORS) + after
    if rng.random() < 0.5:  # waits for the 354, as RFC 2920 asks
        return (Flight(commands), Flight(content))
    return one(commands + content)


def pipeline(rng: random.Random) -> tuple[Flight, ...]:
    return one(b"".join(command(rng) + rng.choice(ENDINGS) for _ in range(rng.randint(2, 6))))


def command_flight(rng: random.Random, line: bytes) -> tuple[Flight, ...]:
    return one(line + rng.choice(ENDINGS))


def envelope(rng: random.Random) -> tuple[Flight, ...]:
    recipients = [rcpt_line(rng) for _ in range(rng.randrange(4))]
    return one(lines([mail_line(rng), *recipients], rng.choice(ENDINGS)))


def quit_(rng: random.Random) -> tuple[Flight, ...]:
    """QUIT, perhaps pipelined behind a message (the 221 must wait for the message's 250)."""
    return one((transaction(rng)[-1].data if rng.random() < 0.5 else b"") + b"QUIT\r\n")


# Part kinds and their weights in the pool.
PART_KINDS: list[tuple[int, Callable[[random.Random], tuple[Flight, ...]]]] = [
    (4, lambda rng: command_flight(rng, rng.choice(GREETINGS))),
    (3, starttls),
    (3, lambda rng: login(rng.choice(["alice", "bob"]), rng.random() < 0.5)),
    (4, authentication),
    (4, envelope),
    (2, lambda rng: command_flight(rng, rcpt_line(rng))),
    (2, lambda rng: command_flight(rng, rng.choice([b"DATA", b"DATA", b"DATA x"]))),
    (4, lambda rng: one(body(rng))),
    (2, lambda rng: one(rng.choice(TERMINATORS))),
    (6, transaction),
    (3, lambda rng: command_flight(rng, rng.choice(SIMPLE))),
    (3, lambda rng: command_flight(rng, garbage(rng))),
    (4, pipeline),
    (1, quit_),
]
POOL_SIZE = 1 << 14
SCENE_PARTS = (1, 2, 3, 4, 5)


@functools.cache
def scene_pool() -> list[tuple[Flight, ...]]:
    """``POOL_SIZE`` distinct scenes, shortest first."""
    rng = random.Random(0)
    weights, kinds = zip(*PART_KINDS, strict=True)
    scenes: set[tuple[Flight, ...]] = set()
    while len(scenes) < POOL_SIZE:
        scenes.add(sum((kind(rng) for kind in rng.choices(kinds, weights, k=rng.choice(SCENE_PARTS))), ()))
    return sorted(scenes, key=lambda scene: (len(scene), sum(len(flight.data) for flight in scene), scene))


PRELUDES = [
    (),
    one(b"EHLO client.test\r\n"),
    login("alice", True),
    login("bob", False),
    one(b"EHLO client.test\r\nSTARTTLS\r\n" + SMUGGLED[3]),
]
POLICIES = st.builds(
    SessionPolicy,
    hostname=st.just(HOSTNAME),
    max_message_size=st.sampled_from([1_048_576, 1_048_576, 120]),
    max_recipients=st.sampled_from([50, 2]),
    tls_available=st.sampled_from([True, True, True, False]),
    tls_active=st.sampled_from([False, False, False, True]),
    max_errors=st.sampled_from([10_000, 10_000, 10_000, 10_000, 10_000, 10]),
)
BUDGETS = st.sampled_from([None, None, 1 << 20, 200])


def cuts(data: bytes, rng: random.Random) -> list[bytes]:
    pieces, start = [], 0
    while start < len(data):
        size = rng.choice((1, 1, 2, 3, 5, 8, 13, 64, 300, 5000))
        pieces.append(data[start : start + size])
        start += size
    return pieces


class ClientSessions(RuleBasedStateMachine):
    """A client sending a burst of scenes per step, read by four cores that must agree."""

    @initialize(
        policy=POLICIES, budget=BUDGETS, prelude=st.sampled_from(PRELUDES), seed=st.integers(0, 2**32 - 1)
    )
    def connect(
        self, policy: SessionPolicy, budget: int | None, prelude: tuple[Flight, ...], seed: int
    ) -> None:
        self.policy, self.budget = policy, budget
        self.rng = random.Random(seed)  # the scattered client's cuts
        self.script = [prelude]  # what the client sent, for the report
        self.dial()
        self.send(prelude)

    def dial(self) -> None:
        """A new connection under the same policy."""
        policy, budget = self.policy, self.budget
        self.per_flight, self.per_byte = Client(policy, budget), BytewiseClient(policy, budget)
        self.per_run, self.scattered = Client(policy, budget), Client(policy, budget)
        self.run: list[Flight] = []

    @rule(burst=st.lists(st.integers(0, POOL_SIZE - 1), min_size=1, max_size=12))
    def converse(self, burst: list[int]) -> None:
        pool = scene_pool()
        for index in burst:
            self.script.append(pool[index])
            self.send(pool[index])
        assert self.per_byte.outputs == self.per_flight.outputs
        self.per_flight.check_budget()
        self.per_byte.check_budget()

    def send(self, flights: tuple[Flight, ...]) -> None:
        for flight in flights:
            CENSUS["steps"] += 1
            self.per_flight.feed([flight.data], flight.handshake_ok)
            self.per_byte.feed_bytes(flight.data, flight.handshake_ok)
            self.run.append(flight)
            if flight.ends_run or self.per_flight.gone:
                self.end_run()
            if self.per_flight.gone:
                self.hang_up()
                self.dial()

    def end_run(self) -> None:
        data, handshake_ok = b"".join(flight.data for flight in self.run), self.run[-1].handshake_ok
        self.run = []
        self.per_run.feed([data], handshake_ok)
        self.scattered.feed(cuts(data, self.rng), handshake_ok)

    def hang_up(self) -> None:
        """The connection's end: all four agree, the outputs pass the checks, no budget is held."""
        if self.run:
            self.end_run()
        clients = (self.per_flight, self.per_byte, self.per_run, self.scattered)
        outputs = self.per_flight.outputs
        for other in clients[1:]:
            assert other.outputs == outputs
        check_outputs(outputs)
        for client in clients:
            client.session.abandon()
            assert client.budget is None or client.budget.held == 0
        CENSUS["sessions"] += 1

    def teardown(self) -> None:
        if hasattr(self, "per_flight"):
            note(self.script)  # printed for a failing example only
            self.hang_up()


COMMON = {
    "database": None,
    "deadline": None,
    "suppress_health_check": [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
}


@pytest.fixture(autouse=True)
def short_pending_data(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_PENDING_DATA", PENDING_DATA)
    CENSUS.clear()


def assert_went_deep(census: Counter[str]) -> None:
    """The generated sessions reached TLS, AUTH, transactions and every end of DATA."""
    for milestone in ("tls", "credentials", "mail", "354", "received", "rejected bare_cr", "closed 221"):
        assert census[milestone] > 0, (milestone, census)


def test_core_agrees_with_itself_however_the_bytes_are_cut() -> None:
    run_state_machine_as_test(
        ClientSessions, settings=settings(max_examples=20, stateful_step_count=8, derandomize=True, **COMMON)
    )
    assert_went_deep(CENSUS)


def fuzz(steps: int) -> Counter[str]:
    """Random examples until ``steps`` steps ran; the census. Runs in a process of its own."""
    protocol.MAX_PENDING_DATA = PENDING_DATA  # a fresh interpreter: no fixture here
    CENSUS.clear()
    while CENSUS["steps"] < steps:
        run_state_machine_as_test(
            ClientSessions, settings=settings(max_examples=200, stateful_step_count=25, **COMMON)
        )
    return CENSUS


@pytest.mark.fuzz
@pytest.mark.timeout(3600)
def test_core_agrees_with_itself_for_a_million_steps() -> None:
    """A step is a flight: a command, an AUTH response, a pipelined group, a DATA chunk.

    Two processes share the steps, as two test processes share the default run.
    """
    started = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(FUZZ_PROCESSES) as pool:
        census = sum(pool.map(fuzz, [-(-FUZZ_STEPS // FUZZ_PROCESSES)] * FUZZ_PROCESSES), Counter())
    elapsed = time.perf_counter() - started
    print(f"{census['steps']} steps in {elapsed:.0f} s, {FUZZ_PROCESSES} processes: {dict(census)}")
    assert census["steps"] >= FUZZ_STEPS
    for reason in ("too_big", "server_busy", "header_from"):
        assert census[f"rejected {reason}"] > 0, (reason, census)
    assert_went_deep(census)
