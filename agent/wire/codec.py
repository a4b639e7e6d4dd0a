"""Strict JSON for everything on the wire: no duplicate keys, no NaN/Infinity, bounded size.

Python's json module accepts duplicate keys (the last one wins) and the
non-standard NaN and Infinity; both have broken signed-JSON systems. Payloads
are checked here first, then validated by frozen pydantic models in strict mode.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Annotated, Any, Final, TypeVar

from pydantic import BaseModel, ConfigDict, PlainSerializer, ValidationError
from pydantic.functional_validators import BeforeValidator

from agent.wire.errors import Reason, WireError

M = TypeVar("M", bound=BaseModel)


# Every model in the agent validates `pattern=` with Python's `re`, not pydantic-core's
# Rust engine: the first Rust pattern costs the daemon about 0.5 MB of its 50 MB budget,
# and `re` is loaded anyway. pydantic *searches* with it, and `re`'s `$` also matches
# before a final newline, so patterns are written with `exactly`, which anchors with `\Z`.
# tests/test_wire.py checks every model of the agent and the fleet for both.
REGEX_ENGINE: Final = "python-re"


def exactly(regex: str) -> str:
    """A `pattern=` for the whole string and nothing more: "v1" plus a newline is not "v1"."""
    if "|" in regex:
        raise ValueError(f"group the alternatives of {regex!r} before anchoring it")
    return f"^{regex}\\Z"


class WireModel(BaseModel):
    """Base for every wire message: frozen, unknown fields refused, no type coercion."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, regex_engine=REGEX_ENGINE)


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}")


def check_strict_json(raw: bytes, *, what: str, reason: Reason) -> None:
    """Raise `WireError(reason)` unless `raw` is UTF-8 JSON without duplicate keys or NaN."""
    try:
        json.loads(
            raw.decode("utf-8"),
            object_pairs_hook=_reject_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise WireError(reason, f"{what} is not strict JSON: {exc}") from None


def parse_model(raw: bytes, model: type[M], *, what: str, reason: Reason) -> M:
    """Parse `raw` strictly into `model`, or raise `WireError(reason)` naming the bad field."""
    check_strict_json(raw, what=what, reason=reason)
    try:
        return model.model_validate_json(raw, strict=True)
    except ValidationError as exc:
        raise refusal(exc, what=what, reason=reason) from None


def refusal(exc: ValidationError, *, what: str, reason: Reason) -> WireError:
    """The WireError for a failed validation, naming the first bad field."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "(top level)"
    more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    return WireError(reason, f"{what} field {where}: {first['msg']}{more}")


def dump_model(message: BaseModel) -> bytes:
    """Serialise a wire model to compact UTF-8 JSON bytes."""
    return message.model_dump_json(by_alias=True).encode("utf-8")


def _b64decode(value: object) -> bytes:
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        raise ValueError("expected a base64 string")  # noqa: TRY004 - pydantic reports ValueError
    try:
        # strict_mode: only the alphabet, correct padding, nothing after it (like
        # b64decode(validate=True), without its regex pass over the whole string).
        return binascii.a2b_base64(value, strict_mode=True)
    except (binascii.Error, ValueError):
        raise ValueError("invalid base64") from None


def b64encode(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


# Standard base64 with padding, decoded strictly (no stray characters).
B64Bytes = Annotated[
    bytes,
    BeforeValidator(_b64decode),
    PlainSerializer(b64encode, return_type=str, when_used="json"),
]
