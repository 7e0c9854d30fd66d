"""The README's signature check, run as written against what the sender signs."""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from smtp_proxy.webhooks.signature import sign

README = Path(__file__).resolve().parents[3] / "README.rst"


def readme_verifier():
    text = README.read_text()
    block = text.split("Verifying a request, in Python::\n\n", 1)[1]
    lines = []
    for line in block.splitlines():
        if line.strip() and not line.startswith("        "):
            break
        lines.append(line)
    namespace: dict = {}
    exec(textwrap.dedent("\n".join(lines)), namespace)  # noqa: S102 - the README's own example
    return namespace["verified"]


def test_the_readme_example_accepts_our_signature_and_refuses_a_changed_body() -> None:
    verified = readme_verifier()
    body = b'{"id":"e1","type":"message.delivered"}'
    header = sign(["whsec_new", "whsec_old"], int(time.time()), body)
    assert verified(body, header, "whsec_new") and verified(body, header, "whsec_old")
    assert not verified(body + b" ", header, "whsec_new")
    assert not verified(body, header, "whsec_other")
    stale = sign(["whsec_new"], int(time.time()) - 301, body)
    assert not verified(body, stale, "whsec_new")
