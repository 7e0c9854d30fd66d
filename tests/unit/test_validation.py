"""Field rules of smtp_proxy.validation."""

from __future__ import annotations

import pytest

from smtp_proxy import validation
from smtp_proxy.errors import ValidationError

# --- account_name ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "alice",
        "A",
        "7",
        "alice.smith",
        "alice_smith",
        "alice-smith",
        "alice+relay",
        "ops@example.com",
        "a" * 64,
    ],
)
def test_account_name_accepts(name: str) -> None:
    assert validation.account_name(name) == name


@pytest.mark.parametrize(
    "name",
    [
        "",
        "a" * 65,
        "-alice",
        ".alice",
        "_alice",
        "@alice",
        "bad name",
        "tab\tname",
        "jörg",
        "semi;colon",
        "slash/name",
        "alice\n",
        "alice\nbob",
        None,
        42,
        ["alice"],
    ],
)
def test_account_name_rejects(name: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.account_name(name)
    assert caught.value.field == "name"


# --- domain ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("Example.COM", "example.com"),
        ("MAIL.Example.Org", "mail.example.org"),
        ("example.com.", "example.com"),
        ("  example.com  ", "example.com"),
        ("a-b.example.co.uk", "a-b.example.co.uk"),
        ("123.example.com", "123.example.com"),
        ("xn--bcher-kva.example", "xn--bcher-kva.example"),
        ("bücher.example", "xn--bcher-kva.example"),
        ("BÜCHER.Example", "xn--bcher-kva.example"),
        ("münchen.de.", "xn--mnchen-3ya.de"),
        ("例え.テスト", "xn--r8jz45g.xn--zckzah"),
        ("a" * 63 + ".com", "a" * 63 + ".com"),
    ],
)
def test_domain_normalises(value: str, expected: str) -> None:
    assert validation.domain(value) == expected


def test_domain_total_length_limit() -> None:
    label = "a" * 63
    longest = ".".join([label, label, label, "a" * 61])  # 253 characters
    assert len(longest) == 253
    assert validation.domain(longest) == longest
    with pytest.raises(ValidationError):
        validation.domain(longest + "a")


@pytest.mark.parametrize(
    "value",
    [
        "",
        ".",
        "localhost",
        "com",
        "com.",
        "a" * 64 + ".com",
        "example.123",
        "1.2.3.4",
        "-example.com",
        "example-.com",
        "exa_mple.com",
        "exa mple.com",
        "example..com",
        ".example.com",
        "*.example.com",
        "example.com/path",
        "user@example.com",
        "ü" * 64 + ".com",
        "example.com\n.",
        None,
        123,
        b"example.com",
    ],
)
def test_domain_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.domain(value)
    assert caught.value.field == "domain"


def test_domain_error_names_the_given_field() -> None:
    with pytest.raises(ValidationError) as caught:
        validation.domain("localhost", field="sender_domain")
    assert caught.value.field == "sender_domain"
    assert "localhost" in str(caught.value)


# --- domain_pattern(s) ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("example.com", "example.com"),
        ("*.example.com", "*.example.com"),
        ("*.Mail.EXAMPLE.com.", "*.mail.example.com"),
        (" *.example.com ", "*.example.com"),
        ("*.bücher.example", "*.xn--bcher-kva.example"),
    ],
)
def test_domain_pattern_accepts(value: str, expected: str) -> None:
    assert validation.domain_pattern(value) == expected


@pytest.mark.parametrize(
    "value",
    ["*", "*.", "*.com", "**.example.com", "*example.com", "a.*.example.com", "*.*.example.com", "", None],
)
def test_domain_pattern_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.domain_pattern(value)
    assert caught.value.field == "allowed_domains"


def test_domain_patterns_normalise_and_dedupe_in_order() -> None:
    given = ["Example.com", "*.example.com", "example.com.", "*.EXAMPLE.com", "other.example", "EXAMPLE.COM"]
    assert validation.domain_patterns(given) == ["example.com", "*.example.com", "other.example"]
    assert validation.domain_patterns(("b.example", "a.example")) == ["b.example", "a.example"]


@pytest.mark.parametrize(
    "values", [[], (), None, "example.com", {"example.com"}, ["example.com", "localhost"], ["example.com", 5]]
)
def test_domain_patterns_rejects(values: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.domain_patterns(values)
    assert caught.value.field == "allowed_domains"


def test_domain_patterns_error_names_the_given_field() -> None:
    with pytest.raises(ValidationError) as caught:
        validation.domain_patterns([], field="domains")
    assert caught.value.field == "domains"


# --- email ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("alice@example.com", "alice@example.com"),
        ("Alice.Smith+tag@Example.COM", "Alice.Smith+tag@example.com"),
        ("ops@mail.example.org.", "ops@mail.example.org"),
        ("o'brien@example.com", "o'brien@example.com"),
        ("x_y-z!#$%&*=?^`{|}~/@example.com", "x_y-z!#$%&*=?^`{|}~/@example.com"),
        ("postmaster@bücher.example", "postmaster@xn--bcher-kva.example"),
        (" alice@example.com ", "alice@example.com"),
        ("a" * 64 + "@example.com", "a" * 64 + "@example.com"),
    ],
)
def test_email_accepts(value: str, expected: str) -> None:
    assert validation.email(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "alice",
        "alice@",
        "@example.com",
        "alice@@example.com",
        "alice@bob@example.com",
        "alice@localhost",
        "alice@example",
        "alice@-example.com",
        ".alice@example.com",
        "alice.@example.com",
        "al..ice@example.com",
        "al ice@example.com",
        '"quoted"@example.com',
        "jörg@example.com",
        "a" * 65 + "@example.com",
        "a@" + "b" * 250 + ".com",
        "alice\n@example.com",
        "alice@example.com\n.",
        None,
        42,
    ],
)
def test_email_rejects(value: object) -> None:
    with pytest.raises(ValidationError) as caught:
        validation.email(value)
    assert caught.value.field == "email"


def test_email_error_names_the_given_field() -> None:
    with pytest.raises(ValidationError) as caught:
        validation.email("nope", field="contact")
    assert caught.value.field == "contact"


def test_domain_uses_idna_2008_so_eszett_is_not_folded_to_ss() -> None:
    assert validation.domain("faß.de") == "xn--fa-hia.de"
