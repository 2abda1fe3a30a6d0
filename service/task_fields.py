"""The fields of a task request besides its image: metadata, Idempotency-Key, task ids."""

from __future__ import annotations

import json
import math
import re

# Far below the nesting at which a task's answer could no longer be serialised.
MAX_METADATA_DEPTH = 32
# The Idempotency-Key's form, for the OpenAPI schema; checked by ``idempotency_key_in``.
IDEMPOTENCY_KEY_SCHEMA = {"minLength": 1, "maxLength": 255, "pattern": "^[!-~]+$"}
_VALID_IDEMPOTENCY_KEY = re.compile(r"[!-~]{1,255}")
# A task id as the server gives it out (a UUID's canonical form), in either case.
_TASK_ID = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)
_JSON_KINDS = {
    list: "array",
    str: "string",
    int: "number",
    float: "number",
    bool: "boolean",
    type(None): "null",
}
_SURROGATE_MESSAGE = (
    "metadata holds an unpaired surrogate (\\ud800 to \\udfff), which is not a character"
)


class InvalidTaskField(Exception):
    """A form field of ``POST /tasks`` other than the image is malformed."""


class TaskNotFound(Exception):
    """No task has this id (never submitted, malformed, or expired after ``TASK_TTL``)."""


class NotPlainJson(ValueError):
    """Metadata that parses, but could not be echoed back as standard JSON."""


def valid_task_id(task_id: str) -> str:
    """The task id in the form the server gives out; 404 for any other."""
    if not _TASK_ID.fullmatch(task_id):
        raise TaskNotFound(f"no task {task_id[:64]}")
    return task_id.lower()


def idempotency_key_in(sent: list[str]) -> str | None:
    """The request's Idempotency-Key, without the blanks around it (not part of a header's
    value, RFC 9110 5.5); None when it has none.

    Raises:
        InvalidTaskField: The header was sent more than once (which key would the client
            mean?), or is not 1 to 255 visible ASCII characters.
    """
    if not sent:
        return None
    if len(sent) > 1:
        raise InvalidTaskField(f"Idempotency-Key was sent {len(sent)} times; send it at most once")
    key = sent[0].strip(" \t")
    if not _VALID_IDEMPOTENCY_KEY.fullmatch(key):
        raise InvalidTaskField(
            "Idempotency-Key must be 1 to 255 visible ASCII characters, e.g. a UUID"
        )
    return key


def parse_metadata(text: str | None, max_bytes: int) -> dict[str, object] | None:
    """The metadata field as a JSON object that any JSON reader can read back."""
    if text is None:
        return None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:  # a raw surrogate, from a form field in charset=utf-7
        raise InvalidTaskField(_SURROGATE_MESSAGE) from None
    if size > max_bytes:
        raise InvalidTaskField(
            f"metadata is {size} bytes; TASK_METADATA_MAX_BYTES allows {max_bytes}"
        )
    try:
        parsed = json.loads(
            text,
            parse_constant=_refuse_constant,
            parse_float=_finite_float,
            parse_int=_float_sized_int,
        )
    except NotPlainJson as exc:
        raise InvalidTaskField(f"metadata: {exc}") from None
    except RecursionError:
        raise InvalidTaskField(_too_deep_message()) from None
    except ValueError:
        raise InvalidTaskField('metadata must be a JSON object, e.g. {"order": 17}') from None
    if not isinstance(parsed, dict):
        kind = _JSON_KINDS.get(type(parsed), "value")
        raise InvalidTaskField(f"metadata must be a JSON object, received a JSON {kind}")
    if _nesting_depth(parsed) > MAX_METADATA_DEPTH:
        raise InvalidTaskField(_too_deep_message())
    try:
        # "\ud800" is valid JSON but not Unicode: the task's status could never be sent.
        json.dumps(parsed, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        raise InvalidTaskField(_SURROGATE_MESSAGE) from None
    return parsed


def _refuse_constant(name: str) -> object:
    # NaN and Infinity are not JSON; echoing them back would break strict clients.
    raise NotPlainJson(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400: Python reads it as infinity
        raise NotPlainJson(_out_of_range(text))
    return value


def _float_sized_int(text: str) -> int:
    """An integer that other JSON readers, which hold numbers as 64-bit floats, can read."""
    try:
        value = int(text)
        float(value)
    except (ValueError, OverflowError):  # over 4300 digits, or past a float's range
        raise NotPlainJson(_out_of_range(text)) from None
    return value


def _out_of_range(number: str) -> str:
    shown = number if len(number) <= 24 else f"{number[:20]}... ({len(number)} characters)"
    return f"{shown} is out of the range of a 64-bit float"


def _nesting_depth(value: object) -> int:
    """How many arrays and objects deep ``value`` goes (an object of scalars is 1)."""
    deepest = 0
    pending = [(value, 1)]
    while pending:
        current, depth = pending.pop()
        if isinstance(current, dict):
            current = list(current.values())
        if isinstance(current, list):
            deepest = max(deepest, depth)
            pending.extend((child, depth + 1) for child in current)
    return deepest


def _too_deep_message() -> str:
    return f"metadata nests arrays and objects more than {MAX_METADATA_DEPTH} levels deep"
