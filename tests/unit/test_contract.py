"""The contract's rules, and every layer that states one of them agreeing with it."""

from __future__ import annotations

import re

import pytest
from jsonschema import Draft202012Validator

from smtp_proxy import contract, validation
from smtp_proxy.api import openapi, schemas
from smtp_proxy.api.errors import ApiError
from smtp_proxy.contract import DeliveryStatus, MailgunRegion, MessageStatus, ProviderType, SmtpTls
from smtp_proxy.db import models
from smtp_proxy.delivery import ses
from smtp_proxy.errors import ValidationError

PATTERNS = ["ACCOUNT_NAME", "SES_REGION", "SES_API_KEY", "HEADER_NAME"]


def test_values_are_the_wire_values_in_declaration_order() -> None:
    assert contract.values(MessageStatus) == ["queued", "processing", "delivered", "failed"]
    assert contract.values(ProviderType) == ["sendgrid", "mailgun", "ses", "smtp"]
    assert contract.values(DeliveryStatus) == ["delivered", "deferred", "failed"]
    assert contract.values(SmtpTls) == ["none", "starttls", "implicit"]
    assert contract.values(MailgunRegion) == ["us", "eu"]


@pytest.mark.parametrize("name", PATTERNS)
def test_patterns_are_anchored_ascii_and_valid_in_json_schema(name: str) -> None:
    pattern = getattr(contract, name)
    assert pattern.startswith("^") and pattern.endswith("$") and pattern.isascii()
    assert "\\d" not in pattern  # Python's \d takes any Unicode digit, ECMA-262's only 0-9
    re.compile(pattern)
    Draft202012Validator.check_schema({"type": "string", "pattern": pattern})


def test_the_models_use_the_contracts_enums_and_lengths() -> None:
    assert models.ProviderType is ProviderType
    assert models.MessageStatus is MessageStatus
    assert models.DeliveryStatus is DeliveryStatus
    tables = models.Base.metadata.tables
    assert tables["esp_providers"].c.provider_type.type.enums == contract.values(ProviderType)
    assert tables["messages"].c.status.type.enums == contract.values(MessageStatus)
    assert tables["delivery_logs"].c.status.type.enums == contract.values(DeliveryStatus)
    assert tables["accounts"].c.name.type.length == contract.ACCOUNT_NAME_MAX
    assert tables["accounts"].c.email.type.length == contract.EMAIL_MAX
    assert tables["esp_providers"].c.name.type.length == contract.NAME_MAX
    assert tables["routing_rules"].c.name.type.length == contract.NAME_MAX


def test_the_schemas_and_the_openapi_document_state_the_contracts_enums() -> None:
    document = openapi.document()
    found = document["components"]["schemas"]
    assert found["ProviderCreate"]["properties"]["provider_type"]["enum"] == contract.values(ProviderType)
    assert found["Provider"]["properties"]["provider_type"]["enum"] == contract.values(ProviderType)
    assert found["Message"]["properties"]["status"]["enum"] == contract.values(MessageStatus)
    assert found["Delivery"]["properties"]["status"]["enum"] == contract.values(DeliveryStatus)
    assert found["SmtpConfig"]["properties"]["tls"]["enum"] == contract.values(SmtpTls)
    assert found["MailgunSettings"]["properties"]["region"]["enum"] == contract.values(MailgunRegion)
    assert found["SesSettings"]["properties"]["region"]["pattern"] == contract.SES_REGION
    assert found["AccountCreate"]["properties"]["name"]["pattern"] == contract.ACCOUNT_NAME
    [status] = [p for p in document["paths"]["/messages"]["get"]["parameters"] if p["name"] == "status"]
    assert status["schema"]["enum"] == contract.values(MessageStatus)


def _schema_accepts(schema_name: str, value: object) -> bool:
    try:
        schemas.check(schema_name, value)
    except ApiError:
        return False
    return True


@pytest.mark.parametrize(
    "name",
    ["alice", "a", "ops@example.com", "a.b_c+d-e", "A" * 64, "A" * 65, ".alice", "-x", "al ice", "älice", ""],
)
def test_the_schema_and_the_validator_agree_on_account_names(name: str) -> None:
    try:
        validation.account_name(name)
        valid = True
    except ValidationError:
        valid = False
    body = {"name": name, "email": "ops@example.com", "allowed_domains": ["example.com"]}
    assert _schema_accepts("AccountCreate", body) is valid


@pytest.mark.parametrize(
    ("region", "valid"),
    [
        ("eu-west-1", True),
        ("us-gov-west-1", True),
        ("ap-southeast-12", True),
        ("eu-west-123", False),
        ("EU-WEST-1", False),
        ("ireland", False),
        ("moon-base", False),
        ("eu-west-١", False),  # an Arabic-Indic digit: Python's \d would take it
    ],
)
def test_the_api_and_the_ses_transport_agree_on_regions(region: str, valid: bool) -> None:
    assert _schema_accepts("SesSettings", {"region": region}) is valid
    assert (ses.REGION.fullmatch(region) is not None) is valid


def _fields(schema_name: str, value: object) -> dict[str, str]:
    with pytest.raises(ApiError) as caught:
        schemas.check(schema_name, value)
    assert caught.value.status == 422
    return caught.value.fields or {}


def test_required_errors_name_every_missing_field() -> None:
    assert _fields("AccountCreate", {"email": "ops@example.com"}) == {
        "name": "is required",
        "allowed_domains": "is required",
    }


def test_nested_errors_name_the_dotted_path() -> None:
    body = {"name": "p", "provider_type": "smtp", "smtp_config": {"host": "h", "helo": "x", "port": 0}}
    assert _fields("ProviderCreate", body) == {
        "smtp_config.tls": "is required",
        "smtp_config.helo": "is not a known field",
        "smtp_config.port": "must be at least 1",
    }


def test_every_unknown_field_is_named() -> None:
    assert _fields("RoutingRuleUpdate", {"name": "r", "colour": 1, "size": 2}) == {
        "colour": "is not a known field",
        "size": "is not a known field",
    }


def test_field_names_quoted_oddly_are_named_as_given() -> None:
    """The names come from the error's structure, not from its English message."""
    odd = 'it\'s "quoted"'
    assert _fields("ProviderUpdate", {odd: 1}) == {odd: "is not a known field"}
    assert _fields("Conditions", {"headers": [{"contains": "x"}]}) == {"headers.0.name": "is required"}
