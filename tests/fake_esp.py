"""A fake email service provider for tests: SendGrid, Mailgun and SES over real HTTP on 127.0.0.1.

One ``FakeEsp`` serves all three APIs on one port and tells them apart by path. It records every
request, checks it against the provider's documented format and credentials, and answers like the
provider would: a request in the wrong format gets 400 (bad credentials 401, or 403 for SES) and is
recorded with ``problems``; a good one gets the scripted answer, or the provider's success answer.

    with FakeEsp() as fake:
        settings = config_from_dict({"delivery": {"endpoints": fake.endpoints()}}, env={}).delivery
        fake.respond(503)                   # every request from now on
        fake.queue(429, Answer(500))        # the next two requests, before the standing answer
        fake.respond(202, delay=2.0)        # answer late (read timeouts)
        ...
        assert [d.recipients for d in fake.messages()] == [("a@example.com",)]

``endpoints()`` gives each provider its own path prefix (``/sendgrid``, ``/mailgun``, ``/mailgun-eu``,
``/ses/{region}``), so a request records which endpoint it used (``Request.region``); ``url`` alone
works too, for all of them, when that does not matter. SES requests must carry a valid SigV4
signature: the fake recomputes it from ``SES_SECRET_KEY`` with its own code (not botocore's).
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import hmac
import json
import re
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email import message_from_bytes, policy
from email.message import EmailMessage, Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, cast
from urllib.parse import quote, unquote

API_KEY = "test-esp-key-4d1f9c2e7b"  # SendGrid and Mailgun
SES_ACCESS_KEY = "AKIAFAKEESP000000001"
SES_SECRET_KEY = "fakeEspSecret/0123456789+abcdefghijklmnopq"
SES_API_KEY = f"{SES_ACCESS_KEY}:{SES_SECRET_KEY}"  # as stored in a provider's api_key

SENDGRID, MAILGUN, SES = "sendgrid", "mailgun", "ses"

_SENDGRID_PATH = re.compile(r"(?P<prefix>.*)/v3/mail/send")
_MAILGUN_PATH = re.compile(r"(?P<prefix>.*?)/v3/(?P<domain>[^/]+)/messages\.mime")
_SES_PATH = re.compile(r"(?P<prefix>.*)/v2/email/outbound-emails")


@dataclass(frozen=True)
class Answer:
    """What the fake answers. ``body``: None for the provider's usual body, a dict/list for JSON."""

    status: int
    body: bytes | str | dict[str, Any] | list[Any] | None = None
    headers: Mapping[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(frozen=True)
class Request:
    """One request as received, and what the fake made of it."""

    provider: str | None  # "sendgrid" | "mailgun" | "ses"; None for an unknown path
    method: str
    path: str
    headers: dict[str, str]  # names in lower case
    body: bytes
    json: Any = None  # the parsed JSON body (SendGrid, SES)
    form: dict[str, list[str]] = field(default_factory=dict)  # multipart text fields (Mailgun)
    files: dict[str, bytes] = field(default_factory=dict)  # multipart file fields (Mailgun)
    region: str | None = None  # "us"/"eu" (Mailgun) or the AWS region (SES), from the endpoints() prefix
    domain: str | None = None  # Mailgun's sending domain, URL-decoded
    problems: tuple[str, ...] = ()  # empty when the request is in the documented format
    status: int = 0  # what the fake answered
    client: tuple[str, int] = ("", 0)  # the client's address: the same port means a reused connection

    @property
    def valid(self) -> bool:
        return not self.problems


@dataclass(frozen=True)
class Delivery:
    """One message the fake accepted (valid and answered 2xx), decoded."""

    provider: str
    recipients: tuple[str, ...]  # Mailgun's to fields, SES's Destination, SendGrid's to/cc/bcc
    sender: str | None  # SES's FromEmailAddress, SendGrid's from.email; None for Mailgun
    raw: bytes | None  # the MIME bytes (Mailgun, SES); None for SendGrid
    payload: dict[str, Any] | None  # SendGrid's JSON body
    request: Request

    @property
    def message(self) -> EmailMessage | None:
        """The raw message parsed; None for SendGrid, which takes JSON."""
        if self.raw is None:
            return None
        return cast(EmailMessage, message_from_bytes(self.raw, policy=policy.default))


class FakeEsp:
    """A threaded HTTP server on 127.0.0.1 posing as SendGrid, Mailgun and SES at once."""

    def __init__(
        self,
        *,
        api_key: str = API_KEY,
        ses_access_key: str = SES_ACCESS_KEY,
        ses_secret_key: str = SES_SECRET_KEY,
    ) -> None:
        self.api_key = api_key
        self.ses_access_key = ses_access_key
        self.ses_secret_key = ses_secret_key
        self._lock = threading.Condition()
        self._requests: list[Request] = []
        self._queued: list[Answer] = []
        self._standing: Answer | None = None
        self._stopping = threading.Event()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle ---------------------------------------------------------------------------------

    def start(self) -> FakeEsp:
        """Listen on a free port of 127.0.0.1 and serve from a background thread."""
        if self._server is not None:
            raise RuntimeError("FakeEsp already started")
        self._stopping.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.02,), name="fake-esp", daemon=True
        )  # a short poll interval: stop() waits for the serving loop to notice
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut delayed answers short and close every connection, including keep-alive ones."""
        server, thread = self._server, self._thread
        if server is None or thread is None:
            return
        self._stopping.set()
        server.shutdown()
        server.close_connections()
        server.server_close()
        thread.join(5)
        server.join_handlers(5)
        self._server = self._thread = None

    def __enter__(self) -> FakeEsp:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """The base URL (no trailing slash); any endpoint may point here."""
        if self._server is None:
            raise RuntimeError("FakeEsp not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    @property
    def port(self) -> int:
        return int(self.url.rsplit(":", 1)[1])

    def endpoints(self) -> dict[str, str]:
        """``delivery.endpoints`` for all four names, each with a prefix the fake recognises."""
        return {
            SENDGRID: f"{self.url}/sendgrid",
            MAILGUN: f"{self.url}/mailgun",
            "mailgun_eu": f"{self.url}/mailgun-eu",
            SES: f"{self.url}/ses/{{region}}",
        }

    # -- scripting ---------------------------------------------------------------------------------

    def respond(
        self,
        status: int,
        body: bytes | str | dict[str, Any] | list[Any] | None = None,
        *,
        headers: Mapping[str, str] | None = None,
        delay: float = 0.0,
    ) -> None:
        """Answer every valid request from now on like this (after any ``queue``d answers)."""
        with self._lock:
            self._standing = Answer(status, body, dict(headers or {}), delay)

    def queue(self, *answers: int | Answer) -> None:
        """One-shot answers for the next valid requests, in order; then the standing answer again."""
        with self._lock:
            self._queued.extend(a if isinstance(a, Answer) else Answer(a) for a in answers)

    def reset(self) -> None:
        """Forget the requests and the scripted answers: back to answering success."""
        with self._lock:
            self._requests.clear()
            self._queued.clear()
            self._standing = None

    # -- what was received -------------------------------------------------------------------------

    @property
    def requests(self) -> list[Request]:
        """Every request so far, in arrival order (a copy)."""
        with self._lock:
            return list(self._requests)

    def invalid(self) -> list[Request]:
        """The requests that broke the documented format or carried bad credentials."""
        return [r for r in self.requests if not r.valid]

    def messages(self, provider: str | None = None) -> list[Delivery]:
        """The messages accepted (valid, answered 2xx), decoded; optionally of one provider only.

        An answer that came too late for the client still counts: the real ESP would have
        accepted that message too.
        """
        found = []
        for request in self.requests:
            if request.valid and 200 <= request.status < 300 and provider in (None, request.provider):
                found.append(_decode(request))
        return found

    def wait_for(self, count: int, timeout: float = 5.0) -> list[Request]:
        """Block until ``count`` requests have been answered; raises TimeoutError otherwise."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while len(self._requests) < count:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise TimeoutError(f"FakeEsp got {len(self._requests)} requests, expected {count}")
                self._lock.wait(remaining)
            return list(self._requests)

    # -- serving (called from handler threads) -----------------------------------------------------

    def _handle(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[Request, Answer]:
        request = _parse(method, path, headers, body)
        if request.provider is None:
            return request, Answer(404, {"message": "not found"})
        check = _CHECKS[request.provider]
        auth_status, problems = check(self, request)
        if problems:
            status = auth_status or 400
            return _replace(request, problems=tuple(problems)), _error(request.provider, status, problems)
        with self._lock:
            answer = self._queued.pop(0) if self._queued else self._standing
        return request, _fill(request, answer or Answer(200 if request.provider != SENDGRID else 202))

    def _record(self, request: Request) -> None:
        with self._lock:
            self._requests.append(request)
            self._lock.notify_all()


# -- the HTTP side ---------------------------------------------------------------------------------


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler], fake: FakeEsp
    ) -> None:
        self.fake = fake
        self._connections: dict[socket.socket, threading.Thread] = {}
        self._connections_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self.process_request_thread, args=(request, client_address), daemon=True
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def shutdown_request(self, request: Any) -> None:
        with self._connections_lock:
            self._connections.pop(request, None)
        super().shutdown_request(request)

    def close_connections(self) -> None:
        with self._connections_lock:
            sockets = list(self._connections)
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def join_handlers(self, timeout: float) -> None:
        with self._connections_lock:
            threads = list(self._connections.values())
        for thread in threads:
            thread.join(timeout)

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gave up (read timeout) leaves a broken pipe behind; that is expected here.
        if not isinstance(sys.exc_info()[1], ConnectionError | TimeoutError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as the real APIs; the transports reuse connections
    timeout = 10
    server: _Server

    def do_POST(self) -> None:  # noqa: N802 (the http.server naming)
        self._serve()

    def do_GET(self) -> None:  # noqa: N802
        self._serve()

    def _serve(self) -> None:
        fake = self.server.fake
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        headers = {name.lower(): value for name, value in self.headers.items()}
        request, answer = fake._handle(self.command, self.path, headers, body)
        payload, content_type = _encode(answer.body)
        fake._record(_replace(request, status=answer.status, client=self.client_address[:2]))
        if answer.delay and fake._stopping.wait(answer.delay):
            self.close_connection = True
            return
        self.send_response(answer.status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for name, value in answer.headers.items():
            self.send_header(name, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


def _encode(body: bytes | str | dict[str, Any] | list[Any] | None) -> tuple[bytes, str | None]:
    if body is None:
        return b"", None
    if isinstance(body, bytes):
        return body, "application/octet-stream"
    if isinstance(body, str):
        return body.encode(), "text/plain; charset=utf-8"
    return json.dumps(body).encode(), "application/json"


def _replace(request: Request, **changes: Any) -> Request:
    return dataclasses.replace(request, **changes)


def _parse(method: str, path: str, headers: dict[str, str], body: bytes) -> Request:
    """Which provider the path belongs to, and the body parsed the way that provider takes it."""
    base = Request(provider=None, method=method, path=path, headers=headers, body=body)
    route = path.split("?", 1)[0]
    if match := _MAILGUN_PATH.fullmatch(route):
        region = {"/mailgun": "us", "/mailgun-eu": "eu"}.get(match["prefix"])
        form, files, problems = _multipart(headers.get("content-type", ""), body)
        domain = unquote(match["domain"])
        fields = {"form": form, "files": files, "region": region, "domain": domain}
        return _replace(base, provider=MAILGUN, problems=tuple(problems), **fields)
    for provider, pattern in ((SENDGRID, _SENDGRID_PATH), (SES, _SES_PATH)):
        if match := pattern.fullmatch(route):
            region = match["prefix"][len("/ses/") :] if match["prefix"].startswith("/ses/") else None
            try:
                document = json.loads(body)
            except ValueError:
                return _replace(base, provider=provider, region=region, problems=("body is not JSON",))
            return _replace(base, provider=provider, region=region, json=document)
    return _replace(base, problems=(f"no such API path: {path}",))


def _multipart(content_type: str, body: bytes) -> tuple[dict[str, list[str]], dict[str, bytes], list[str]]:
    """multipart/form-data split by hand on the boundary, so that file bytes come back exactly."""
    header = Message()
    header["Content-Type"] = content_type
    boundary = header.get_param("boundary")
    if header.get_content_type() != "multipart/form-data" or not isinstance(boundary, str):
        return {}, {}, [f"Content-Type is {content_type!r}, not multipart/form-data"]
    form: dict[str, list[str]] = {}
    files: dict[str, bytes] = {}
    segments = (b"\r\n" + body).split(b"\r\n--" + boundary.encode())
    if len(segments) < 3 or not segments[-1].startswith(b"--"):
        return {}, {}, ["malformed multipart body"]
    for segment in segments[1:-1]:
        _, _, part = segment.partition(b"\r\n")  # the rest of the boundary line
        head, separator, content = part.partition(b"\r\n\r\n")
        if not separator:
            return {}, {}, ["malformed multipart part"]
        part_headers = message_from_bytes(head + b"\r\n\r\n")
        name = part_headers.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            return {}, {}, ["multipart part without a name"]
        if part_headers.get_param("filename", header="content-disposition") is not None:
            files[name] = content
        else:
            form.setdefault(name, []).append(content.decode("utf-8"))
    return form, files, []


# -- the providers' formats ------------------------------------------------------------------------

_Check = Callable[[FakeEsp, Request], tuple[int | None, list[str]]]

_SENDGRID_TOP = {
    "personalizations", "from", "reply_to", "reply_to_list", "subject", "content", "attachments",
    "template_id", "headers", "categories", "custom_args", "send_at", "batch_id", "asm", "ip_pool_name",
    "mail_settings", "tracking_settings",
}  # fmt: skip
_SENDGRID_PERSONALIZATION = {
    "to", "cc", "bcc", "from", "subject", "headers", "substitutions", "dynamic_template_data",
    "custom_args", "send_at",
}  # fmt: skip
_SENDGRID_RESERVED = {
    "x-sg-id", "x-sg-eid", "received", "dkim-signature", "content-type", "content-transfer-encoding",
    "to", "from", "subject", "reply-to", "cc", "bcc",
}  # fmt: skip


def _check_sendgrid(fake: FakeEsp, request: Request) -> tuple[int | None, list[str]]:
    """SendGrid v3 Mail Send: Bearer key, JSON, and the body rules of the docs and the error list."""
    if request.headers.get("authorization") != f"Bearer {fake.api_key}":
        return 401, ["The provided authorization grant is invalid, expired, or revoked"]
    problems = list(request.problems)
    if request.method != "POST":
        problems.append(f"method {request.method}, not POST")
    if not request.headers.get("content-type", "").startswith("application/json"):
        problems.append("Content-Type is not application/json")
    body = request.json
    if problems or not isinstance(body, dict):
        return None, problems or ["body is not a JSON object"]
    problems += [f"unknown field {k}" for k in body if k not in _SENDGRID_TOP]
    personalizations = body.get("personalizations")
    seen: set[str] = set()
    if not isinstance(personalizations, list) or not 1 <= len(personalizations) <= 1000:
        problems.append("personalizations must be a list of 1 to 1000 objects")
        personalizations = []
    for i, item in enumerate(personalizations):
        if not isinstance(item, dict):
            problems.append(f"personalizations.{i} is not an object")
            continue
        problems += [
            f"unknown field personalizations.{i}.{k}" for k in item if k not in _SENDGRID_PERSONALIZATION
        ]
        if not item.get("to"):
            problems.append(f"personalizations.{i}.to is required")
        for kind in ("to", "cc", "bcc"):
            for j, entry in enumerate(item.get(kind) or []):
                where = f"personalizations.{i}.{kind}.{j}"
                problems += _email_object(entry, where)
                address = str(entry.get("email", "")).lower() if isinstance(entry, dict) else ""
                if address in seen:
                    problems.append(f"{where}: {address} is included more than once")
                seen.add(address)
    if len(seen) > 1000:
        problems.append("more than 1000 recipients")
    problems += _email_object(body.get("from"), "from")
    if "reply_to" in body and "reply_to_list" in body:
        problems.append("reply_to and reply_to_list are mutually exclusive")
    if "reply_to" in body:
        problems += _email_object(body["reply_to"], "reply_to")
    for j, entry in enumerate(body.get("reply_to_list") or []):
        problems += _email_object(entry, f"reply_to_list.{j}")
    subject = body.get("subject")
    if not (isinstance(subject, str) and subject) and "template_id" not in body:
        if not all(isinstance(p, dict) and p.get("subject") for p in personalizations):
            problems.append("The subject is required (a string at least one character long)")
    problems += _sendgrid_content(body)
    for i, attachment in enumerate(body.get("attachments") or []):
        problems += _sendgrid_attachment(attachment, f"attachments.{i}")
    headers = body.get("headers", {})
    if not isinstance(headers, dict):
        problems.append("headers must be an object")
        headers = {}
    for name, value in headers.items():
        if name.lower() in _SENDGRID_RESERVED:
            problems.append(f"headers: {name} is a reserved header")
        if not isinstance(value, str) or not value.isascii() or "\r" in value or "\n" in value:
            problems.append(f"headers.{name} must be an ASCII string on one line")
    return None, problems


def _email_object(entry: Any, where: str) -> list[str]:
    if not isinstance(entry, dict) or not isinstance(entry.get("email"), str) or "@" not in entry["email"]:
        return [f"{where} must be an object with a valid email"]
    if set(entry) - {"email", "name"} or not isinstance(entry.get("name", ""), str):
        return [f"{where} may only have email and a string name"]
    return []


def _sendgrid_content(body: dict[str, Any]) -> list[str]:
    content = body.get("content")
    if content is None and "template_id" in body:
        return []
    if not isinstance(content, list) or not content:
        return ["content must be a list of at least one object"]
    problems = []
    types = []
    for i, item in enumerate(content):
        if not isinstance(item, dict) or not all(
            isinstance(item.get(k), str) and item[k] for k in ("type", "value")
        ):
            problems.append(f"content.{i} needs a non-empty type and value")
            continue
        types.append(item["type"])
    expected = [t for t in ("text/plain", "text/html") if t in types]
    if types[: len(expected)] != expected or len(types) != len(set(types)):
        problems.append("text/plain and text/html may only be provided once, first, in that order")
    return problems


def _sendgrid_attachment(attachment: Any, where: str) -> list[str]:
    if not isinstance(attachment, dict):
        return [f"{where} is not an object"]
    problems = []
    try:
        base64.b64decode(attachment.get("content", ""), validate=True)
    except (binascii.Error, TypeError, ValueError):
        problems.append(f"{where}.content must be base64")
    if not isinstance(attachment.get("filename"), str) or not attachment["filename"]:
        problems.append(f"{where}.filename is required")
    disposition = attachment.get("disposition", "attachment")
    if disposition not in ("attachment", "inline"):
        problems.append(f"{where}.disposition must be attachment or inline")
    if disposition == "inline" and not attachment.get("content_id"):
        problems.append(f"{where}.content_id is required for an inline attachment")
    return problems


def _check_mailgun(fake: FakeEsp, request: Request) -> tuple[int | None, list[str]]:
    """Mailgun messages.mime: basic auth api:<key>, multipart with ``to`` fields and a ``message`` file."""
    expected = "Basic " + base64.b64encode(f"api:{fake.api_key}".encode()).decode()
    if request.headers.get("authorization") != expected:
        return 401, ["Forbidden"]
    problems = list(request.problems)
    if request.method != "POST":
        problems.append(f"method {request.method}, not POST")
    if problems:
        return None, problems
    recipients = _split(request.form.get("to", []))
    if not recipients:
        problems.append("'to' parameter is missing")
    if len(recipients) > 1000:
        problems.append("more than 1000 recipients")
    if "message" in request.form:
        problems.append("'message' must be sent as a file upload, not a text field")
    elif not request.files.get("message"):
        problems.append("'message' parameter is missing")
    elif b"\r\n\r\n" not in request.files["message"] and b"\n\n" not in request.files["message"]:
        problems.append("'message' is not a MIME message (no header/body separator)")
    if not request.domain or "/" in request.domain:
        problems.append("bad domain in the path")
    return None, problems


def _check_ses(fake: FakeEsp, request: Request) -> tuple[int | None, list[str]]:
    """SES v2 SendEmail: a SigV4 signature recomputed here, then the JSON body's shape."""
    auth_problem = _sigv4_problem(fake, request)
    if auth_problem:
        return 403, [auth_problem]
    problems = list(request.problems)
    if request.method != "POST":
        problems.append(f"method {request.method}, not POST")
    if not request.headers.get("content-type", "").startswith("application/json"):
        problems.append("Content-Type is not application/json")
    body = request.json
    if problems or not isinstance(body, dict):
        return None, problems or ["body is not a JSON object"]
    allowed = {
        "FromEmailAddress", "FromEmailAddressIdentityArn", "Destination", "ReplyToAddresses",
        "FeedbackForwardingEmailAddress", "FeedbackForwardingEmailAddressIdentityArn", "Content", "EmailTags",
        "ConfigurationSetName", "ListManagementOptions", "EndpointId",
    }  # fmt: skip
    problems += [f"unknown field {k}" for k in body if k not in allowed]
    raw = (body.get("Content") or {}).get("Raw") if isinstance(body.get("Content"), dict) else None
    try:
        data = base64.b64decode(raw["Data"], validate=True) if isinstance(raw, dict) else b""
    except (binascii.Error, TypeError, ValueError, KeyError):
        data = b""
    if not data:
        problems.append("Content.Raw.Data must be the base64 of a non-empty message")
    destination = body.get("Destination", {})
    count = 0
    if not isinstance(destination, dict):
        problems.append("Destination must be an object")
        destination = {}
    for kind in ("ToAddresses", "CcAddresses", "BccAddresses"):
        addresses = destination.get(kind, [])
        if not isinstance(addresses, list) or not all(isinstance(a, str) and "@" in a for a in addresses):
            problems.append(f"Destination.{kind} must be a list of addresses")
            continue
        count += len(addresses)
    if count > 50:
        problems.append("more than 50 recipients")
    if "FromEmailAddress" in body and not (
        isinstance(body["FromEmailAddress"], str) and body["FromEmailAddress"]
    ):
        problems.append("FromEmailAddress must be a non-empty string when given")
    return None, problems


_AUTH = re.compile(
    r"AWS4-HMAC-SHA256 Credential=(?P<key>[^/,\s]+)/(?P<date>\d{8})/(?P<region>[^/,\s]+)"
    r"/(?P<service>[^/,\s]+)/aws4_request, ?SignedHeaders=(?P<signed>[a-z0-9;-]+),"
    r" ?Signature=(?P<signature>[0-9a-f]{64})"
)


def _sigv4_problem(fake: FakeEsp, request: Request) -> str | None:
    """Why the request's Signature Version 4 does not hold, or None when it does."""
    match = _AUTH.fullmatch(request.headers.get("authorization", ""))
    if match is None:
        return "IncompleteSignatureException: malformed Authorization header"
    if match["key"] != fake.ses_access_key:
        return "UnrecognizedClientException: The security token included in the request is invalid."
    amz_date = request.headers.get("x-amz-date", "")
    try:
        when = datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=UTC)
    except ValueError:
        return "IncompleteSignatureException: missing or malformed X-Amz-Date"
    if abs((datetime.now(UTC) - when).total_seconds()) > 900:
        return "InvalidSignatureException: Signature expired"
    if match["date"] != amz_date[:8] or match["service"] != SES:
        return f"SignatureDoesNotMatch: bad credential scope {match['date']}/{match['service']}"
    if request.region is not None and match["region"] != request.region:
        return f"SignatureDoesNotMatch: scope region {match['region']} but endpoint region {request.region}"
    signed = match["signed"].split(";")
    if not {"host", "x-amz-date"} <= set(signed) or signed != sorted(signed):
        return "SignatureDoesNotMatch: host and x-amz-date must be signed, headers sorted"
    if any(name not in request.headers for name in signed):
        return "SignatureDoesNotMatch: a signed header is missing"
    path, _, query = request.path.partition("?")
    canonical = "\n".join(
        [
            request.method,
            quote(path, safe="/~"),  # non-S3 services: the path as sent, URI-encoded once more
            "&".join(sorted(query.split("&"))) if query else "",
            "".join(f"{name}:{' '.join(request.headers[name].split())}\n" for name in signed),
            ";".join(signed),
            hashlib.sha256(request.body).hexdigest(),
        ]
    )
    scope = f"{match['date']}/{match['region']}/{SES}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + fake.ses_secret_key).encode()
    for part in (match["date"], match["region"], SES, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["signature"]):
        return "SignatureDoesNotMatch: The request signature we calculated does not match the one provided."
    return None


_CHECKS: dict[str, _Check] = {SENDGRID: _check_sendgrid, MAILGUN: _check_mailgun, SES: _check_ses}


def _error(provider: str, status: int, problems: Iterable[str]) -> Answer:
    """An error answer in the provider's own shape."""
    problems = list(problems)
    if provider == SENDGRID:
        return Answer(status, {"errors": [{"message": p, "field": None, "help": None} for p in problems]})
    if provider == SES:
        error_type, _, message = (
            problems[0].partition(": ") if status == 403 else ("BadRequestException", "", "")
        )
        return Answer(status, {"message": message or "; ".join(problems)}, {"x-amzn-ErrorType": error_type})
    return Answer(status, {"message": "; ".join(problems)})


_SES_ERROR_TYPES = {
    400: "BadRequestException",
    401: "UnrecognizedClientException",
    403: "AccessDeniedException",
    404: "NotFoundException",
    413: "RequestEntityTooLargeException",
    429: "TooManyRequestsException",
    500: "InternalFailure",
    503: "ServiceUnavailable",
}


def _fill(request: Request, answer: Answer) -> Answer:
    """The provider's usual body and headers for a scripted status that came without them."""
    if answer.body is not None:
        return answer
    provider, status = request.provider, answer.status
    headers = dict(answer.headers)
    if 200 <= status < 300:
        if provider == SENDGRID:
            headers.setdefault("X-Message-Id", uuid.uuid4().hex[:22])
            return Answer(status, b"", headers, answer.delay)
        if provider == MAILGUN:
            body = {"id": f"<{uuid.uuid4().hex}@{request.domain}>", "message": "Queued. Thank you."}
            return Answer(status, body, headers, answer.delay)
        return Answer(status, {"MessageId": uuid.uuid4().hex}, headers, answer.delay)
    message = f"scripted answer {status}"
    if provider == SENDGRID:
        return Answer(
            status, {"errors": [{"message": message, "field": None, "help": None}]}, headers, answer.delay
        )
    if provider == SES:
        fallback = "InternalFailure" if status >= 500 else "BadRequestException"
        headers.setdefault("x-amzn-ErrorType", _SES_ERROR_TYPES.get(status, fallback))
    return Answer(status, {"message": message}, headers, answer.delay)


def _split(values: Iterable[str]) -> list[str]:
    return [address.strip() for value in values for address in value.split(",") if address.strip()]


def _decode(request: Request) -> Delivery:
    if request.provider == MAILGUN:
        recipients = tuple(_split(request.form.get("to", [])))
        return Delivery(MAILGUN, recipients, None, request.files["message"], None, request)
    body = cast(dict[str, Any], request.json)
    if request.provider == SES:
        destination = body.get("Destination", {})
        kinds = ("ToAddresses", "CcAddresses", "BccAddresses")
        recipients = tuple(a for kind in kinds for a in destination.get(kind, []))
        raw = base64.b64decode(body["Content"]["Raw"]["Data"])
        return Delivery(SES, recipients, body.get("FromEmailAddress"), raw, None, request)
    recipients = tuple(
        entry["email"]
        for p in body["personalizations"]
        for kind in ("to", "cc", "bcc")
        for entry in p.get(kind, [])
    )
    return Delivery(SENDGRID, recipients, body["from"]["email"], None, body, request)
