"""msgpack on NATS, JSON at the gateway: one place that encodes and decodes."""

import json
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, TypeAdapter, ValidationError

from schemas.events import Event

_EVENT = TypeAdapter(Event)
M = TypeVar("M", bound=BaseModel)


class DecodeError(ValueError):
    """The bytes are not valid msgpack or JSON of the expected shape."""


def encode(model: BaseModel) -> bytes:
    """Encode a model as msgpack, dropping nothing."""
    return msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)


def encode_json(model: BaseModel) -> bytes:
    return json.dumps(model.model_dump(mode="json"), separators=(",", ":")).encode()


def loads(data: bytes, content_type: str = "application/msgpack") -> Any:
    """Parse bytes as msgpack or JSON.

    Raises:
        DecodeError: the bytes do not parse.
    """
    try:
        if "json" in content_type:
            return json.loads(data)
        return msgpack.unpackb(data, raw=False)
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
    "ValidationError",
    "decode",
    "decode_event",
    "encode",
    "encode_json",
    "loads",
    "packed_size",
]
