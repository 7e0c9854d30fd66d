"""An account's own SMTP login, for tests: its stored hash, and the account as AUTH gives it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from smtp_proxy.db.models import Account
from smtp_proxy.smtp.credentials import AuthenticatedAccount
from smtp_proxy.storage.credentials import primary_credential


def login_hash(session: Session, account: Account) -> str:
    """The hash of the credential whose user name is the account's name (it must exist)."""
    credential = primary_credential(session, account)
    assert credential is not None, f"{account.name} has no login of its own"
    return credential.password_hash


def logged_in(session: Session, account: Account) -> AuthenticatedAccount:
    """The account as a session that logged in with its own login sees it after AUTH."""
    credential = primary_credential(session, account)
    assert credential is not None, f"{account.name} has no login of its own"
    return AuthenticatedAccount(
        account.id,
        account.name,
        tuple(account.allowed_domains),
        credential_id=credential.id,
        username=credential.username,
    )
