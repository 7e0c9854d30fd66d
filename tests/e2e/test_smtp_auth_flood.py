"""The AUTH throttle against parallel guessing, through real TLS connections.

Every attempt is counted before it is judged, so however many connections guess at
once, at most the configured number get a verdict (535); the rest get 454 without a
password check. Other source addresses are 127.0.0.x (Linux routes all of 127/8 to lo).
"""

from __future__ import annotations

import base64
import socket
import ssl
import threading
from collections import Counter

from tests.e2e.conftest import Listener, RawClient


class Guesser(RawClient):
    """A client from a chosen local address, ready to send AUTH after STARTTLS and EHLO."""

    def __init__(self, listener: Listener, source: str = "127.0.0.1") -> None:
        self.sock = socket.create_connection(
            (listener.host, listener.port), timeout=60, source_address=(source, 0)
        )
        self._buffer = b""

    def prepare(self, context: ssl.SSLContext) -> None:
        assert self.reply().startswith(b"220 ")
        self.send(b"EHLO client.test\r\nSTARTTLS\r\n")
        assert self.reply().startswith(b"250")
        assert self.reply().startswith(b"220 2.0.0")
        self.starttls(context)
        self.send(b"EHLO client.test\r\n")
        assert b"AUTH PLAIN LOGIN" in self.reply()

    def auth(self, username: str, password: str) -> bytes:
        token = base64.b64encode(f"\0{username}\0{password}".encode()).decode()
        self.send(f"AUTH PLAIN {token}\r\n".encode())
        return self.reply()[:3]


def guess_in_parallel(
    listener: Listener, context: ssl.SSLContext, guesses: list[tuple[str, str, str]]
) -> Counter[bytes]:
    """Each (source, user, password) on its own connection, all AUTH lines sent at one moment."""
    barrier = threading.Barrier(len(guesses))
    codes: list[bytes] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def guess(source: str, username: str, password: str) -> None:
        client = Guesser(listener, source)
        try:
            client.prepare(context)
            barrier.wait(timeout=120)
            code = client.auth(username, password)
            with lock:
                codes.append(code)
        except BaseException as error:
            errors.append(error)
            barrier.abort()
        finally:
            client.close()

    threads = [threading.Thread(target=guess, args=item) for item in guesses]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(180)
        assert not thread.is_alive()
    assert not errors, errors[:3]
    return Counter(codes)


def test_500_parallel_wrong_guesses_from_one_address_get_at_most_the_limit_of_verdicts(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener(max_connections_per_ip=0, max_connections=1000)
    listener.server.authenticator.throttle.configure(per_ip=10, per_user=1000, window=900)
    verifier = listener.server.authenticator.verifier
    checks: list[str] = []
    original = verifier._check_hash

    def counted(password: str, password_hash: str) -> bool:
        checks.append(password)  # list.append is atomic; bcrypt runs on several threads
        return original(password, password_hash)

    verifier._check_hash = counted  # type: ignore[method-assign]
    guesses = [("127.0.0.1", f"user{i}", "wrong password") for i in range(500)]
    codes = guess_in_parallel(listener, client_tls, guesses)
    assert sum(codes.values()) == 500
    assert codes[b"535"] <= 10
    assert codes[b"454"] >= 490
    assert set(codes) <= {b"535", b"454"}
    assert len(checks) == codes[b"535"]  # no bcrypt for a refused attempt
    # The address stays refused, even with the right password ...
    late = Guesser(listener)
    late.prepare(client_tls)
    assert late.auth(listener.tenant, listener.password) == b"454"
    late.close()
    # ... while another address logs in.
    other = Guesser(listener, "127.0.0.2")
    other.prepare(client_tls)
    assert other.auth(listener.tenant, listener.password) == b"235"
    other.close()


def test_the_user_name_limit_refuses_a_guess_spread_over_many_addresses(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener()
    listener.server.authenticator.throttle.configure(per_ip=100, per_user=5, window=900)
    guesses = [(f"127.0.0.{i}", listener.tenant, f"guess {i}") for i in range(2, 14)]
    codes = guess_in_parallel(listener, client_tls, guesses)
    assert codes[b"535"] <= 5 and codes[b"454"] >= 7 and sum(codes.values()) == 12
    # Other user names from the same addresses are still judged.
    client = Guesser(listener, "127.0.0.2")
    client.prepare(client_tls)
    assert client.auth("someone-else", "x") == b"535"
    client.close()


def test_a_success_clears_neither_the_address_nor_another_users_failures(
    start_listener, client_tls: ssl.SSLContext
) -> None:
    listener: Listener = start_listener()
    listener.server.authenticator.throttle.configure(per_ip=4, per_user=3, window=900)
    client = Guesser(listener)
    client.prepare(client_tls)
    codes = [client.auth("bob", "wrong"), client.auth("bob", "wrong")]
    good = Guesser(listener)
    good.prepare(client_tls)
    codes.append(good.auth(listener.tenant, listener.password))
    good.close()
    codes += [client.auth("carol", "wrong"), client.auth("carol", "wrong"), client.auth("carol", "wrong")]
    client.close()
    # 2 failures, a success (its own count given back), 2 more: the address is at 4 of 4.
    assert codes == [b"535", b"535", b"235", b"535", b"535", b"454"]
    # bob's two failures still count for him, from another address.
    elsewhere = Guesser(listener, "127.0.0.3")
    elsewhere.prepare(client_tls)
    assert [elsewhere.auth("bob", "wrong"), elsewhere.auth("bob", "wrong")] == [b"535", b"454"]
    elsewhere.close()
