"""The trusted-network keys (PROXY protocol senders, X-Forwarded-For proxies): strict CIDRs, one-line
errors naming the key and the index, and which of them a running process takes without a restart."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Any

import pytest

from smtp_proxy.config import config_from_dict, load_config
from smtp_proxy.errors import ConfigError
from smtp_proxy.reload import RESTART_KEYS

KEYS = ("smtp.proxy_protocol_from", "api.proxy_protocol_from", "api.trusted_proxies")


def networks(dotted: str, value: Any, env: dict[str, str] | None = None) -> tuple[Any, ...]:
    section, key = dotted.split(".")
    config = config_from_dict({section: {key: value}}, env=env or {})
    return getattr(getattr(config, section), key)


def error(dotted: str, value: Any) -> ConfigError:
    with pytest.raises(ConfigError) as raised:
        networks(dotted, value)
    return raised.value


@pytest.mark.parametrize("dotted", KEYS)
def test_nothing_is_trusted_by_default(dotted: str) -> None:
    section, key = dotted.split(".")
    assert getattr(getattr(config_from_dict({}, env={}), section), key) == ()
    assert networks(dotted, None) == ()
    assert networks(dotted, []) == ()


def test_the_header_timeout_defaults_to_a_few_seconds() -> None:
    smtp = config_from_dict({}, env={}).smtp
    assert smtp.proxy_protocol_timeout == 5.0
    assert (
        config_from_dict({"smtp": {"proxy_protocol_timeout": "500ms"}}, env={}).smtp.proxy_protocol_timeout
        == 0.5
    )


@pytest.mark.parametrize("dotted", KEYS)
def test_networks_and_single_addresses_are_accepted(dotted: str) -> None:
    assert networks(dotted, ["10.0.0.0/24", "2001:db8::/64", "192.0.2.7", "::1"]) == (
        ipaddress.ip_network("10.0.0.0/24"),
        ipaddress.ip_network("2001:db8::/64"),
        ipaddress.ip_network("192.0.2.7/32"),
        ipaddress.ip_network("::1/128"),
    )


def test_a_string_is_a_list_of_one_and_the_environment_fills_items() -> None:
    assert networks("smtp.proxy_protocol_from", "10.1.0.0/16") == (ipaddress.ip_network("10.1.0.0/16"),)
    assert networks("smtp.proxy_protocol_from", "${LB}", {"LB": "10.2.0.0/16"}) == (
        ipaddress.ip_network("10.2.0.0/16"),
    )
    assert networks("smtp.proxy_protocol_from", ["${LB}"], {"LB": "10.3.0.5"}) == (
        ipaddress.ip_network("10.3.0.5/32"),
    )


@pytest.mark.parametrize(
    ("value", "where", "problem"),
    [
        (
            ["10.0.0.0/24", "10.0.0.1/24"],
            "[1]",
            "'10.0.0.1/24' has host bits set (did you mean 10.0.0.0/24?)",
        ),
        (["balancer.example.com"], "[0]", "not a network such as 10.0.0.0/24: 'balancer.example.com'"),
        (["10.0.0.0/33"], "[0]", "not a network such as 10.0.0.0/24: '10.0.0.0/33'"),
        (["0.0.0.0/0"], "[0]", "'0.0.0.0/0' would trust every address; name your balancers"),
        (["::/0"], "[0]", "'::/0' would trust every address; name your balancers"),
        ([1234], "[0]", "expected a network such as 10.0.0.0/24, got 1234"),
        ({"lb": "10.0.0.1"}, "", "expected a list of networks such as 10.0.0.0/24, got {'lb': '10.0.0.1'}"),
    ],
)
@pytest.mark.parametrize("dotted", KEYS)
def test_a_bad_network_is_one_line_naming_the_key_and_index(
    dotted: str, value: Any, where: str, problem: str
) -> None:
    raised = error(dotted, value)
    assert raised.key == dotted + where
    assert raised.problem == problem
    assert "\n" not in str(raised)


def test_a_bad_network_in_a_file_stops_the_load(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("smtp:\n  proxy_protocol_from: [10.0.0.0/8, 10.1.2.3/16]\n")
    with pytest.raises(ConfigError) as raised:
        load_config(path, env={})
    assert str(raised.value).startswith("smtp.proxy_protocol_from[1]: '10.1.2.3/16' has host bits set")


def test_the_listener_takes_its_balancers_live_and_the_api_at_a_restart() -> None:
    """The SMTP listener judges each new connection by the live config; waitress's channels and
    the WSGI middleware are built once, at start."""
    before = config_from_dict({}, env={})
    after = config_from_dict(
        {
            "smtp": {"proxy_protocol_from": ["10.0.0.5"], "proxy_protocol_timeout": "2s"},
            "api": {"proxy_protocol_from": ["10.0.0.5"], "trusted_proxies": ["10.0.0.6"]},
        },
        env={},
    )
    changed = after.changed_keys(before)
    assert changed == [
        "smtp.proxy_protocol_from",
        "smtp.proxy_protocol_timeout",
        "api.proxy_protocol_from",
        "api.trusted_proxies",
    ]
    assert [key for key in changed if key in RESTART_KEYS] == [
        "api.proxy_protocol_from",
        "api.trusted_proxies",
    ]
