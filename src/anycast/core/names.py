"""Validation of the names users give to deployments, regions and artifacts."""

from __future__ import annotations

import re

from anycast.core.errors import InvalidInput

NAME_RULE = (
    "1-63 characters of lowercase letters, digits and '-', "
    "starting with a letter and not ending with '-'"
)
_NAME = re.compile(r"^[a-z]([a-z0-9-]{0,61}[a-z0-9])?$")

VERSION_RULE = (
    "1-64 characters of letters, digits, '.', '_', '+' and '-', starting with a letter or digit"
)
_VERSION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")

HANDLER_RULE = "a Python identifier of at most 64 characters, such as 'predict'"
_HANDLER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")

ARTIFACT_ID_RULE = "64 lowercase hex digits (the SHA-256 of the artifact's manifest)"
_ARTIFACT_ID = re.compile(r"^[0-9a-f]{64}$")


def _check(value: object, pattern: re.Pattern[str], what: str, rule: str) -> str:
    if not isinstance(value, str) or not pattern.fullmatch(value):
        raise InvalidInput(f"{what} must be {rule}, got {value!r}", code="invalid_name")
    return value


def check_name(value: object, what: str = "name") -> str:
    """Return ``value`` if it is a valid deployment or region name, else raise InvalidInput."""
    return _check(value, _NAME, what, NAME_RULE)


def check_version(value: object) -> str:
    return _check(value, _VERSION, "version", VERSION_RULE)


def check_handler(value: object) -> str:
    return _check(value, _HANDLER, "handler", HANDLER_RULE)


def check_artifact_id(value: object) -> str:
    return _check(value, _ARTIFACT_ID, "artifact id", ARTIFACT_ID_RULE)
