"""Rotating the encryption key: old data keeps opening, `keys reencrypt` re-seals it."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

from sqlalchemy import create_engine, select, text

from smtp_proxy.config import config_from_dict, decode_key
from smtp_proxy.crypto import Cipher, generate_encryption_key, key_id
from smtp_proxy.db.models import DkimKey, EspProvider, Message, WebhookEndpoint
from smtp_proxy.db.session import Database
from smtp_proxy.db.types import utcnow
from smtp_proxy.storage import accounts, dkim_keys, messages, providers, webhooks
from smtp_proxy.storage.audit import CLI
from tests.cli_runner import run_cli


def _run(args: list[str], db_url: str, config: Path) -> subprocess.CompletedProcess[str]:
    return run_cli(["--config", str(config), *args], env={"DATABASE_URL": db_url})


def _seed(db_url: str, old_key: str) -> None:
    config = config_from_dict({"security": {"encryption_key": old_key, "bcrypt_cost": 4}}, env={})
    database = Database(config_from_dict({"database": {"url": db_url}}, env={}).database)
    cipher = Cipher.from_config(config.security)
    with database.transaction() as session:
        owner = accounts.create_account(
            session,
            name="t",
            email="t@example.com",
            allowed_domains=["example.com"],
            bcrypt_cost=4,
            actor=CLI,
        ).account
        dkim_keys.create_key(
            session, cipher, account=owner, domain="example.com", algorithm="ed25519-sha256", actor=CLI
        )
        providers.create_provider(
            session,
            cipher,
            account_id=owner.id,
            name="sg",
            provider_type="sendgrid",
            api_key="SG.secret",
            actor=CLI,
        )
        hook = webhooks.create_endpoint(
            session,
            cipher,
            account_id=owner.id,
            url_="https://hooks.example.net/in",
            events=["message.failed"],
            actor=CLI,
        )
        webhooks.rotate_secret(session, cipher, hook.endpoint, actor=CLI)  # two sealed secrets
        for n in range(7):
            messages.enqueue_message(
                session,
                cipher,
                account_id=owner.id,
                sender="a@example.com",
                recipients=["b@example.net"],
                data=f"Subject: {n}\r\n\r\nbody {n}\r\n".encode(),
                correlation_id=f"c{n}",
            )
    database.dispose()


def test_reencrypt_moves_every_secret_and_body_to_the_new_key(db_url: str, tmp_path: Path) -> None:
    old_key, new_key = generate_encryption_key(), generate_encryption_key()
    _seed(db_url, old_key)
    config = tmp_path / "config.yaml"
    config.write_text(f"security:\n  encryption_key: {new_key}\n  previous_encryption_keys: [{old_key}]\n")
    result = _run(["keys", "reencrypt", "--batch-size", "3"], db_url, config)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["provider_secrets"] == 1 and report["message_bodies"] == 7
    assert report["webhook_secrets"] == 2
    assert report["dkim_keys"] == 1

    # Everything now opens with the new key alone.
    new_only = Cipher(decode_key(new_key, "k"))
    engine = create_engine(db_url)
    with engine.connect() as connection:
        blobs = connection.execute(text("SELECT id, body_encrypted FROM messages")).all()
        api_key_blob = connection.execute(text("SELECT id, api_key_encrypted FROM esp_providers")).one()
        dkim_blob = connection.execute(text("SELECT private_key_encrypted FROM dkim_keys")).scalar_one()
    engine.dispose()
    assert bytes(dkim_blob)[1:5] == key_id(decode_key(new_key, "k"))
    assert all(bytes(blob)[1:5] == key_id(decode_key(new_key, "k")) for _id, blob in blobs)
    assert bytes(api_key_blob[1])[1:5] == key_id(decode_key(new_key, "k"))
    database = Database(config_from_dict({"database": {"url": db_url}}, env={}).database)
    with database.transaction() as session:
        for message in session.scalars(select(Message)):
            assert messages.message_body(new_only, message).startswith(b"Subject: ")
        provider = session.scalars(select(EspProvider)).one()
        assert providers.provider_secrets(new_only, provider).api_key == "SG.secret"
        endpoint = session.scalars(select(WebhookEndpoint)).one()
        assert len(webhooks.signing_secrets(new_only, endpoint, now=utcnow())) == 2
        owner_id = session.scalars(select(DkimKey)).one().account_id
        (signing,) = dkim_keys.signing_keys(session, new_only, owner_id)
        assert signing.domain == "example.com" and len(base64.b64decode(signing.private_key)) == 32
    database.dispose()

    again = _run(["keys", "reencrypt"], db_url, config)
    assert json.loads(again.stdout) == {
        **report,
        "provider_secrets": 0,
        "webhook_secrets": 0,
        "dkim_keys": 0,
        "message_bodies": 0,
    }


def test_reencrypt_without_the_old_key_fails_in_one_line(db_url: str, tmp_path: Path) -> None:
    _seed(db_url, generate_encryption_key())
    config = tmp_path / "config.yaml"
    config.write_text(f"security:\n  encryption_key: {generate_encryption_key()}\n")
    result = _run(["keys", "reencrypt"], db_url, config)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
    assert "unknown key id" in result.stderr
