"""msgpack on NATS, JSON at the gateway: one place that encodes and decodes.

Everything spinyard exchanges is plain data (`schemas.plain`). Decoding
refuses what the formats would otherwise let in: msgpack extension types
and JSON's non-standard `NaN`/`Infinity`; `check_plain` (re-exported here)
refuses what parses but is not plain.
"""

import json
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.events import Event
from schemas.plain import NotPlainError, check_plain

_EVENT = TypeAdapter(Event)
M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """The bytes are not valid msgpack or JSON of the expected shape."""


def encode(model: BaseModel) -> bytes:
    """Encode a model as msgpack, dropping nothing."""
    return msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)


def encode_json(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":")).encode()


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not accepted")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes, content_type: str = "application/msgpack") -> Any:
    """Parse bytes as msgpack or JSON; msgpack extension types and JSON `NaN` are refused.

    Raises:
        DecodeError: the bytes do not parse.
    """
    try:
        if "json" in content_type:
            return json.loads(data, parse_constant=_refuse_constant)
        return msgpack.unpackb(data, raw=False, ext_hook=_refuse_ext)
    except (ValueError, msgpack.UnpackException, TypeError, RecursionError) as exc:
        raise DecodeError(f"body is not valid {content_type}") from exc


def packed_size(value: Any) -> int:
    """How many bytes `value` takes as msgpack: what the run inputs limit counts."""
    return len(msgpack.packb(value, use_bin_type=True))


def decode(model: type[M], data: bytes) -> M:
    """Decode msgpack bytes into `model`.

    Raises:
        DecodeError: not msgpack.
        pydantic.ValidationError: msgpack, but not the model's shape.
    """
    return model.model_validate(loads(data))


def decode_event(data: bytes, content_type: str = "application/msgpack") -> Event:
    """Decode any event by its `type` field.

    Raises:
        DecodeError: not msgpack/JSON.
        pydantic.ValidationError: no known `type`, or fields that don't fit it.
    """
    obj = loads(data, content_type)
    return _EVENT.validate_python(obj)


__all__ = [
    "DecodeError",
    "NotPlainError",
    "ValidationError",
    "check_plain",
    "decode",
    "decode_event",
    "encode",
    "encode_json",
    "loads",
    "packed_size",
]
