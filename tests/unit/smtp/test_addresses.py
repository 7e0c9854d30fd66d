"""RFC 5321 path and parameter parsing, and allowed-domain matching, of smtp_proxy.smtp.addresses."""

from __future__ import annotations

import pytest

from smtp_proxy.smtp.addresses import (
    Path,
    PathError,
    decode_xtext,
    domain_allowed,
    parse_mail_from,
    parse_rcpt_to,
)


def _domain(length: int) -> str:
    """A valid domain of exactly ``length`` octets: labels of at most 63 octets, then ".com"."""
    labels: list[str] = []
    remaining = length - len("com")
    while remaining > 0:
        size = min(63, remaining - 1)  # a label costs its size plus one dot
        if remaining - (size + 1) == 1:
            size -= 1  # never leave room for a lone dot
        labels.append("d" * size)
        remaining -= size + 1
    domain = ".".join([*labels, "com"])
    assert len(domain) == length
    return domain


def _error(parse, argument: str) -> PathError:
    with pytest.raises(PathError) as caught:
        parse(argument)
    return caught.value


# --- MAIL FROM: accepted paths --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "address"),
    [
        ("FROM:<alice@example.com>", "alice@example.com"),
        ("from:<alice@example.com>", "alice@example.com"),
        ("From:<alice@example.com>", "alice@example.com"),
        ("FROM: <alice@example.com>", "alice@example.com"),
        ("FROM:<Alice@Example.COM>", "Alice@Example.COM"),
        ("FROM:<first.last@mail.example.com>", "first.last@mail.example.com"),
        ("FROM:<a+tag@example.com>", "a+tag@example.com"),
        ("FROM:<!#$%&'*+-/=?^_`{|}~@example.com>", "!#$%&'*+-/=?^_`{|}~@example.com"),
        ("FROM:<a@my-host.example.com>", "a@my-host.example.com"),
        ("FROM:<a@123.example.com>", "a@123.example.com"),
        ("FROM:<a@a-b--c.example.com>", "a@a-b--c.example.com"),
        ("FROM:<a@xn--fa-hia.de>", "a@xn--fa-hia.de"),
        ("FROM:<a@example.com>   ", "a@example.com"),
        ('FROM:<"john doe"@example.com>', '"john doe"@example.com'),
        ('FROM:<"a\\"b"@example.com>', '"a\\"b"@example.com'),
        ('FROM:<"a\\\\b"@example.com>', '"a\\\\b"@example.com'),
        ('FROM:<"a>b"@example.com>', '"a>b"@example.com'),
        ('FROM:<"a@b"@example.com>', '"a@b"@example.com'),
        ('FROM:<"..a."@example.com>', '"..a."@example.com'),
        ('FROM:<"a,b:c<d"@example.com>', '"a,b:c<d"@example.com'),
        ('FROM:<""@example.com>', '""@example.com'),
        ("FROM:<@a.example.com:alice@example.com>", "alice@example.com"),
        ("FROM:<@a.example.com,@b.example.org:alice@example.com>", "alice@example.com"),
        ("FROM:<alice@[192.0.2.1]>", "alice@[192.0.2.1]"),
        ("FROM:<alice@[0.0.0.0]>", "alice@[0.0.0.0]"),
        ("FROM:<alice@[255.255.255.255]>", "alice@[255.255.255.255]"),
        ("FROM:<alice@[IPv6:2001:db8::1]>", "alice@[IPv6:2001:db8::1]"),
        ("FROM:<alice@[ipv6:2001:DB8::1]>", "alice@[ipv6:2001:DB8::1]"),
        ("FROM:<alice@[IPv6:2001:db8:0:0:0:0:0:1]>", "alice@[IPv6:2001:db8:0:0:0:0:0:1]"),
        ("FROM:<alice@[IPv6:::ffff:192.0.2.1]>", "alice@[IPv6:::ffff:192.0.2.1]"),
    ],
)
def test_mail_from_accepts_path_when_valid(argument: str, address: str) -> None:
    path = parse_mail_from(argument)
    assert path == Path(address, {})


def test_mail_from_returns_null_path_when_empty_brackets() -> None:
    assert parse_mail_from("FROM:<>") == Path("", {})


def test_mail_from_accepts_params_when_null_path() -> None:
    assert parse_mail_from("FROM:<> SIZE=0 BODY=7BIT") == Path("", {"SIZE": "0", "BODY": "7BIT"})


def test_mail_from_returns_null_path_when_space_after_colon() -> None:
    assert parse_mail_from("FROM: <>").address == ""


# --- MAIL FROM: refused paths ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argument",
    [
        # Keyword, colon and brackets.
        "",
        "FROM:",
        "FROM",
        "<alice@example.com>",
        "TO:<alice@example.com>",
        "FROM<alice@example.com>",
        "FROM <alice@example.com>",
        "FROM;<alice@example.com>",
        " FROM:<alice@example.com>",
        "FROM:  <alice@example.com>",
        "FROM:alice@example.com",
        "FROM:<alice@example.com",
        "FROM:alice@example.com>",
        "FROM:<<alice@example.com>>",
        "FROM:<alice@example.com>>",
        "FROM:<alice@example.com>SIZE=1",
        "FROM:<alice@example.com>x",
        "FROM:<alice@example.com><bob@example.com>",
        "FROM:<>x",
        # Local part.
        "FROM:<Postmaster>",
        "FROM:<alice>",
        "FROM:<@example.com>",
        "FROM:<.alice@example.com>",
        "FROM:<alice.@example.com>",
        "FROM:<al..ice@example.com>",
        "FROM:<.@example.com>",
        "FROM:<al ice@example.com>",
        'FROM:<al"ice@example.com>',
        "FROM:<al(ice)@example.com>",
        "FROM:<al,ice@example.com>",
        "FROM:<al[ice@example.com>",
        "FROM:<al:ice@example.com>",
        "FROM:<al;ice@example.com>",
        "FROM:<a\\b@example.com>",
        "FROM:<alice@@example.com>",
        "FROM:<alice@bob@example.com>",
        # Quoted local part.
        'FROM:<"alice@example.com>',
        'FROM:<"alice"bob@example.com>',
        'FROM:<"alice">',
        'FROM:<"alice\\"@example.com>',
        'FROM:<"a"."b"@example.com>',
        'FROM:<alice."b"@example.com>',
        # Domain.
        "FROM:<alice@>",
        "FROM:<alice@example>",
        "FROM:<alice@com>",
        "FROM:<alice@example.com.>",
        "FROM:<alice@.example.com>",
        "FROM:<alice@example..com>",
        "FROM:<alice@-example.com>",
        "FROM:<alice@example-.com>",
        "FROM:<alice@example.-com>",
        "FROM:<alice@exa_mple.com>",
        "FROM:<alice@exa mple.com>",
        "FROM:<alice@example.com,>",
        "FROM:<alice@1.2.3.4>",
        "FROM:<alice@example.123>",
        # Address literals.
        "FROM:<alice@[192.0.2.256]>",
        "FROM:<alice@[192.0.2]>",
        "FROM:<alice@[192.0.2.1.5]>",
        "FROM:<alice@[010.0.2.1]>",
        "FROM:<alice@[192.0.2.-1]>",
        "FROM:<alice@[ 192.0.2.1]>",
        "FROM:<alice@[192.0.2.1>",
        "FROM:<alice@192.0.2.1]>",
        "FROM:<alice@[]>",
        "FROM:<alice@[example.com]>",
        "FROM:<alice@[2001:db8::1]>",
        "FROM:<alice@[IPv6:2001:db8::g]>",
        "FROM:<alice@[IPv6:1::2::3]>",
        "FROM:<alice@[IPv6:1:2:3:4:5:6:7:8:9]>",
        "FROM:<alice@[IPv6:fe80::1%eth0]>",
        "FROM:<alice@[IPv6:192.0.2.1]>",
        "FROM:<alice@[IPv6:]>",
        "FROM:<alice@[IPv4:192.0.2.1]>",
        "FROM:<alice@[x-tag:content]>",
        # Source routes.
        "FROM:<@a.example.com alice@example.com>",
        "FROM:<@a.example.com,b.example.com:alice@example.com>",
        "FROM:<@:alice@example.com>",
        "FROM:<@a.example.com,:alice@example.com>",
        "FROM:<@a.example.com:>",
        "FROM:<@a.example.com,@b.example.com:>",
        "FROM:<@[192.0.2.1]:alice@example.com>",
        "FROM:<@a:alice@example.com>",
    ],
)
def test_mail_from_rejects_path_when_syntax_invalid(argument: str) -> None:
    assert _error(parse_mail_from, argument).kind == "syntax"


@pytest.mark.parametrize(
    "argument",
    [
        "FROM:<ålice@example.com>",
        "FROM:<alice@exämple.com>",
        'FROM:<"ålice"@example.com>',
        "FROM:<alice@example.com> BODY=8BITMIMÉ",
        "FROM:<alice@example.com>\u00a0SIZE=1",
        "FROM:<alice@example.com\u200b>",
    ],
)
def test_mail_from_rejects_path_when_non_ascii(argument: str) -> None:
    assert _error(parse_mail_from, argument).kind == "syntax"


@pytest.mark.parametrize("char", ["\x00", "\t", "\r", "\n", "\x1b", "\x7f"])
@pytest.mark.parametrize(
    "template",
    [
        "FROM:<al{}ice@example.com>",
        'FROM:<"al{}ice"@example.com>',
        "FROM:<alice@exa{}mple.com>",
        "FROM:<alice@example.com>{}",
        "FROM:<alice@example.com>{}SIZE=1",
        "FROM:<alice@example.com> SIZE=1{}",
        "FROM:{}<alice@example.com>",
    ],
)
def test_mail_from_rejects_path_when_control_character(template: str, char: str) -> None:
    assert _error(parse_mail_from, template.format(char)).kind == "syntax"


# --- lengths (RFC 5321 4.5.3.1) -------------------------------------------------------------------


@pytest.mark.parametrize(
    "local",
    ["a" * 64, '"' + "a" * 62 + '"', "a." * 31 + "aa"],
)
def test_mail_from_accepts_local_part_when_64_octets(local: str) -> None:
    assert len(local) == 64
    assert parse_mail_from(f"FROM:<{local}@example.com>").address == f"{local}@example.com"


@pytest.mark.parametrize(
    "local",
    ["a" * 65, '"' + "a" * 63 + '"', "a." * 32 + "a", "a" * 200],
)
def test_mail_from_rejects_local_part_when_over_64_octets(local: str) -> None:
    error = _error(parse_mail_from, f"FROM:<{local}@example.com>")
    assert error.kind == "too_long"
    assert "local part" in str(error)


def test_rcpt_to_rejects_local_part_when_over_64_octets() -> None:
    assert _error(parse_rcpt_to, f"TO:<{'b' * 65}@example.com>").kind == "too_long"


def test_mail_from_rejects_domain_when_over_255_octets() -> None:
    error = _error(parse_mail_from, f"FROM:<a@{_domain(256)}>")
    assert error.kind == "too_long"
    assert "domain longer" in str(error)


def test_mail_from_rejects_path_when_255_octet_domain_exceeds_path_limit() -> None:
    # RFC 5321 allows a 255-octet domain but only a 256-octet path, so "<a@" + 255 + ">" is too long.
    error = _error(parse_mail_from, f"FROM:<a@{_domain(255)}>")
    assert error.kind == "too_long"
    assert "path longer" in str(error)


def test_mail_from_accepts_domain_when_largest_that_fits_path() -> None:
    address = f"a@{_domain(252)}"
    assert len(f"<{address}>") == 256
    assert parse_mail_from(f"FROM:<{address}>").address == address


@pytest.mark.parametrize("domain_length", [189, 220, 252])  # local part of 64, 33 and 1 octets
def test_mail_from_accepts_path_when_256_octets(domain_length: int) -> None:
    domain = _domain(domain_length)
    local = "a" * (256 - len("<@>") - domain_length)
    assert len(f"<{local}@{domain}>") == 256
    assert parse_mail_from(f"FROM:<{local}@{domain}>").address == f"{local}@{domain}"


@pytest.mark.parametrize("domain_length", [190, 220, 253])  # local part of 64, 34 and 1 octets
def test_mail_from_rejects_path_when_257_octets(domain_length: int) -> None:
    domain = _domain(domain_length)
    local = "a" * (257 - len("<@>") - domain_length)
    assert len(f"<{local}@{domain}>") == 257
    error = _error(parse_mail_from, f"FROM:<{local}@{domain}>")
    assert error.kind == "too_long"
    assert "path longer" in str(error)


def test_mail_from_rejects_path_when_source_route_makes_it_over_256_octets() -> None:
    mailbox = f"a@{_domain(200)}"
    route = f"@{_domain(60)}"
    assert len(f"<{mailbox}>") < 256 < len(f"<{route}:{mailbox}>")
    assert _error(parse_mail_from, f"FROM:<{route}:{mailbox}>").kind == "too_long"


def test_mail_from_accepts_path_when_params_make_line_longer_than_256() -> None:
    address = f"a@{_domain(252)}"
    path = parse_mail_from(f"FROM:<{address}> SIZE={'9' * 20} BODY=8BITMIME")
    assert path.address == address


def test_mail_from_accepts_label_when_63_octets() -> None:
    address = f"alice@{'l' * 63}.example.com"
    assert parse_mail_from(f"FROM:<{address}>").address == address


def test_mail_from_rejects_label_when_64_octets() -> None:
    assert _error(parse_mail_from, f"FROM:<alice@{'l' * 64}.example.com>").kind == "too_long"


# --- MAIL FROM: parameters ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("", {}),
        ("SIZE=1000", {"SIZE": "1000"}),
        ("size=1000", {"SIZE": "1000"}),
        ("Size=0", {"SIZE": "0"}),
        ("SIZE=007", {"SIZE": "007"}),
        ("SIZE=" + "9" * 20, {"SIZE": "9" * 20}),
        ("BODY=8BITMIME", {"BODY": "8BITMIME"}),
        ("BODY=7BIT", {"BODY": "7BIT"}),
        ("body=8bitmime", {"BODY": "8BITMIME"}),
        ("BODY=7bit", {"BODY": "7BIT"}),
        ("SIZE=1 BODY=7BIT", {"SIZE": "1", "BODY": "7BIT"}),
        ("BODY=8BITMIME SIZE=12345", {"BODY": "8BITMIME", "SIZE": "12345"}),
        ("SIZE=1   BODY=7BIT  ", {"SIZE": "1", "BODY": "7BIT"}),
    ],
)
def test_mail_from_parses_params_when_valid(params: str, expected: dict[str, str | None]) -> None:
    assert parse_mail_from(f"FROM:<alice@example.com> {params}").params == expected


@pytest.mark.parametrize(
    "params",
    [
        # SIZE (RFC 1870).
        "SIZE=" + "9" * 21,
        "SIZE=" + "1" * 100,
        "SIZE=-1",
        "SIZE=+1",
        "SIZE=1.5",
        "SIZE=1e3",
        "SIZE=0x10",
        "SIZE=abc",
        "SIZE",
        "SIZE=",
        "SIZE==1",
        "SIZE=1=2",
        "SIZE=1 SIZE=2",
        "SIZE=1 size=1",
        # BODY (RFC 6152).
        "BODY=BINARYMIME",
        "BODY=8BIT",
        "BODY=8BITMIME2",
        "BODY=",
        "BODY",
        "BODY=7BIT BODY=7BIT",
        "BODY=7BIT body=8BITMIME",
        # Unknown keywords.
        "SMTPUTF8",
        "AUTH=<>",
        "RET=FULL",
        "ENVID=abc",
        "X-FOO=bar",
        "SIZE=1 X-FOO",
        # Malformed keywords.
        "=1",
        "-X=1",
        "SI_ZE=1",
        "SIZE:1",
        "SIZE=1,BODY=7BIT",
    ],
)
def test_mail_from_rejects_params_when_invalid(params: str) -> None:
    assert _error(parse_mail_from, f"FROM:<alice@example.com> {params}").kind == "param"


def test_mail_from_rejects_params_when_null_path_and_unknown() -> None:
    assert _error(parse_mail_from, "FROM:<> RET=HDRS").kind == "param"


def test_mail_from_reports_syntax_before_params_when_both_bad() -> None:
    assert _error(parse_mail_from, "FROM:<alice> X-FOO").kind == "syntax"


def test_mail_from_rejects_size_when_not_allowed() -> None:
    error = _error(lambda a: parse_mail_from(a, allowed_params=frozenset()), "FROM:<a@example.com> SIZE=1")
    assert error.kind == "param"


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ("SMTPUTF8", {"SMTPUTF8": None}),
        ("smtputf8", {"SMTPUTF8": None}),
        ("AUTH=<>", {"AUTH": "<>"}),
        ("AUTH=alice+40example.com SMTPUTF8", {"AUTH": "alice+40example.com", "SMTPUTF8": None}),
    ],
)
def test_mail_from_keeps_params_when_extra_keywords_allowed(
    params: str, expected: dict[str, str | None]
) -> None:
    allowed = frozenset({"SIZE", "BODY", "SMTPUTF8", "AUTH"})
    assert parse_mail_from(f"FROM:<a@example.com> {params}", allowed_params=allowed).params == expected


def test_mail_from_rejects_param_when_allowed_keyword_repeated() -> None:
    with pytest.raises(PathError) as caught:
        parse_mail_from("FROM:<a@example.com> SMTPUTF8 SMTPUTF8", allowed_params=frozenset({"SMTPUTF8"}))
    assert caught.value.kind == "param"


# --- RCPT TO --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argument", "address"),
    [
        ("TO:<bob@example.com>", "bob@example.com"),
        ("to:<bob@example.com>", "bob@example.com"),
        ("To:<Bob@Example.com>", "Bob@Example.com"),
        ("TO: <bob@example.com>", "bob@example.com"),
        ("TO:<bob@example.com>  ", "bob@example.com"),
        ('TO:<"bob \\"the builder\\""@example.com>', '"bob \\"the builder\\""@example.com'),
        ("TO:<@relay.example.com:bob@example.com>", "bob@example.com"),
        ("TO:<bob@[192.0.2.1]>", "bob@[192.0.2.1]"),
        ("TO:<bob@[IPv6:2001:db8::1]>", "bob@[IPv6:2001:db8::1]"),
        ("TO:<Postmaster@example.com>", "Postmaster@example.com"),
        ("TO:<postmaster@example.com>", "postmaster@example.com"),
    ],
)
def test_rcpt_to_accepts_path_when_valid(argument: str, address: str) -> None:
    assert parse_rcpt_to(argument) == Path(address, {})


@pytest.mark.parametrize(
    "argument",
    ["TO:<Postmaster>", "TO:<postmaster>", "TO:<POSTMASTER>", "to:<PostMaster>", "TO: <Postmaster>"],
)
def test_rcpt_to_accepts_postmaster_when_no_domain(argument: str) -> None:
    path = parse_rcpt_to(argument)
    assert path == Path("Postmaster", {})
    assert path.domain == ""


@pytest.mark.parametrize(
    "argument",
    [
        "TO:<>",
        "TO: <>",
        "TO:<> ",
        "FROM:<bob@example.com>",
        "TO <bob@example.com>",
        "TO<bob@example.com>",
        "TO:bob@example.com",
        "TO:<bob@example.com",
        "TO:<bob>",
        "TO:<bob@example>",
        "TO:<@relay.example.com:Postmaster>",
        "TO:<Postmaster >",
        "TO:<Postmaster.>",
        "TO:<Postmaster@>",
        "TO:<bob@example.com>NOTIFY=NEVER",
        "TO:<bøb@example.com>",
        "TO:<bob@example.com\x00>",
    ],
)
def test_rcpt_to_rejects_path_when_syntax_invalid(argument: str) -> None:
    assert _error(parse_rcpt_to, argument).kind == "syntax"


@pytest.mark.parametrize(
    "params",
    ["SIZE=1", "BODY=7BIT", "NOTIFY=NEVER", "ORCPT=rfc822;bob@example.com", "X-FOO", "=", "bad_param"],
)
def test_rcpt_to_rejects_any_param_when_none_allowed(params: str) -> None:
    assert _error(parse_rcpt_to, f"TO:<bob@example.com> {params}").kind == "param"


def test_rcpt_to_rejects_param_when_postmaster_and_none_allowed() -> None:
    assert _error(parse_rcpt_to, "TO:<Postmaster> NOTIFY=NEVER").kind == "param"


def test_rcpt_to_keeps_param_when_allowed() -> None:
    path = parse_rcpt_to("TO:<bob@example.com> notify=NEVER", allowed_params=frozenset({"NOTIFY"}))
    assert path.params == {"NOTIFY": "NEVER"}


# --- RFC 3461 (DSN) parameters -------------------------------------------------------------------

DSN_MAIL = frozenset({"SIZE", "BODY", "RET", "ENVID"})
DSN_RCPT = frozenset({"NOTIFY", "ORCPT"})


@pytest.mark.parametrize(
    ("xtext", "text"),
    [("", ""), ("abc", "abc"), ("a+2Bb", "a+b"), ("+3D+20x", "= x"), ("+7E~", "~~"), ("x+00", "x\x00")],
)
def test_decode_xtext_when_valid(xtext: str, text: str) -> None:
    assert decode_xtext(xtext) == text


@pytest.mark.parametrize("xtext", ["+", "+4", "+4g", "+zz", "a+2b", "a=b", "a b", "\x7f"])
def test_decode_xtext_rejects_when_not_xtext(xtext: str) -> None:
    with pytest.raises(ValueError):
        decode_xtext(xtext)


def test_mail_from_normalises_dsn_params() -> None:
    path = parse_mail_from("FROM:<a@example.com> ret=hdrs envid=x+2By", allowed_params=DSN_MAIL)
    assert path.params == {"RET": "HDRS", "ENVID": "x+y"}


def test_rcpt_to_normalises_dsn_params() -> None:
    argument = "TO:<b@example.com> notify=Success,failure orcpt=RFC822;B+40example.com"
    path = parse_rcpt_to(argument, allowed_params=DSN_RCPT)
    assert path.params == {"NOTIFY": "SUCCESS,FAILURE", "ORCPT": "rfc822;B@example.com"}


def test_orcpt_of_500_characters_is_accepted_and_501_is_not() -> None:
    """RFC 3461 4.2 counts the encoded value, address type included."""
    taken = "RFC822;" + "a" * 481 + "@example.com"
    assert len(taken) == 500
    path = parse_rcpt_to(f"TO:<b@example.com> ORCPT={taken}", DSN_RCPT)
    assert path.params["ORCPT"] == "rfc822;" + "a" * 481 + "@example.com"
    error = _error(lambda a: parse_rcpt_to(a, DSN_RCPT), f"TO:<b@example.com> ORCPT={taken}a")
    assert error.kind == "value" and str(error) == "ORCPT longer than 500 characters"


def test_envid_counts_the_encoded_characters() -> None:
    """RFC 3461 4.4: 100 characters of xtext, so "+2B" counts three."""
    assert (
        parse_mail_from("FROM:<a@x.example> ENVID=" + "+2B" * 33 + "a", DSN_MAIL).params["ENVID"]
        == "+" * 33 + "a"
    )
    error = _error(lambda a: parse_mail_from(a, DSN_MAIL), "FROM:<a@x.example> ENVID=" + "+2B" * 34)
    assert error.kind == "value" and str(error) == "ENVID longer than 100 characters"


# --- Path and PathError ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "domain"),
    [
        ("alice@example.com", "example.com"),
        ("Alice@Mail.EXAMPLE.com", "mail.example.com"),
        ("", ""),
        ("Postmaster", ""),
        ('"a@b"@Example.COM', "example.com"),
        ("alice@[192.0.2.1]", "[192.0.2.1]"),
        ("alice@[IPv6:2001:DB8::1]", "[IPv6:2001:DB8::1]"),
    ],
)
def test_path_domain_is_lower_cased_when_a_name(address: str, domain: str) -> None:
    assert Path(address, {}).domain == domain


def test_path_keeps_local_part_case_when_parsed() -> None:
    path = parse_mail_from("FROM:<Alice.Smith@MAIL.Example.COM>")
    assert path.address == "Alice.Smith@MAIL.Example.COM"
    assert path.domain == "mail.example.com"


def test_path_is_immutable_when_created() -> None:
    path = Path("alice@example.com", {})
    with pytest.raises(AttributeError):
        path.address = "mallory@example.com"  # type: ignore[misc]


def test_path_error_is_value_error_when_raised() -> None:
    error = _error(parse_mail_from, "FROM:alice@example.com")
    assert isinstance(error, ValueError)
    assert str(error)


# --- domain_allowed -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("domain", "patterns", "expected"),
    [
        # Exact patterns.
        ("example.com", ["example.com"], True),
        ("EXAMPLE.com", ["example.com"], True),
        ("example.com", ["Example.COM"], True),
        ("example.com.", ["example.com"], True),
        ("example.com", ["example.com."], True),
        ("mail.example.com", ["example.com"], False),
        ("example.org", ["example.com"], False),
        ("example.com.evil.org", ["example.com"], False),
        ("xexample.com", ["example.com"], False),
        # Wildcard patterns.
        ("a.example.com", ["*.example.com"], True),
        ("a.b.example.com", ["*.example.com"], True),
        ("a.b.c.d.example.com", ["*.example.com"], True),
        ("A.Example.Com", ["*.EXAMPLE.com"], True),
        ("a.example.com.", ["*.example.com"], True),
        ("example.com", ["*.example.com"], False),
        ("example.com.", ["*.example.com"], False),
        ("badexample.com", ["*.example.com"], False),
        ("a.badexample.com", ["*.example.com"], False),
        ("a.example.com.evil.org", ["*.example.com"], False),
        ("a.example.com", ["*.a.example.com"], False),
        ("b.a.example.com", ["*.a.example.com"], True),
        # Several patterns.
        ("example.com", ["*.example.com", "example.com"], True),
        ("other.org", ["example.com", "other.org"], True),
        ("x.other.org", ["example.com", "*.other.org"], True),
        ("third.net", ["example.com", "*.other.org"], False),
        # Nothing to match.
        ("example.com", [], False),
        ("", ["example.com"], False),
        ("", ["*.example.com"], False),
        ("", [""], False),
        (".", [""], False),
        ("example.com", [""], False),
        ("example.com", ["*"], False),
        ("example.com", ["*."], False),
        # Address literals.
        ("[192.0.2.1]", ["[192.0.2.1]"], False),
        ("[192.0.2.1]", ["*.example.com"], False),
        ("[IPv6:2001:db8::1]", ["[ipv6:2001:db8::1]"], False),
    ],
)
def test_domain_allowed_matches_when_pattern_fits(domain: str, patterns: list[str], expected: bool) -> None:
    assert domain_allowed(domain, patterns) is expected


def test_domain_allowed_accepts_patterns_when_a_generator() -> None:
    assert domain_allowed("a.example.com", (p for p in ["example.org", "*.example.com"]))


@pytest.mark.parametrize(
    ("argument", "expected"),
    [
        ("FROM:<alice@Example.COM>", True),
        ("FROM:<alice@mail.example.com>", False),
        ("FROM:<>", False),
        ("FROM:<alice@[192.0.2.1]>", False),
    ],
)
def test_domain_allowed_matches_parsed_sender_when_exact_pattern(argument: str, expected: bool) -> None:
    assert domain_allowed(parse_mail_from(argument).domain, ["example.com"]) is expected
