"""Open Inference Protocol v2 (KServe v2 / Triton HTTP) requests and responses, without I/O.

``parse_infer_request`` turns a request body into validated numpy arrays or raises
:class:`ProtocolError` with the HTTP status and a message that says what was expected.
Both JSON tensors and the binary tensor extension (``Inference-Header-Content-Length``) are
understood; see https://github.com/triton-inference-server/server/blob/main/docs/protocol/
extension_binary_data.md.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .model import Array, Signature, TensorSpec, format_shape

HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(Exception):
    """A request refused: the HTTP ``status`` to answer and a one-line ``message``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def bad_request(message: str) -> ProtocolError:
    """``ProtocolError(400, message)``."""
    return ProtocolError(400, message)


# The longest text a JSON number takes for one element: float64's longest round-trip repr is 24
# characters ("-2.2250738585072014e-308"; int64's extremes take 20), plus json.dumps' default
# ", " separator. Elements of every datatype fit in it, in JSON and in binary (itemsize <= 8).
JSON_BYTES_PER_ELEMENT = 26
# Everything in a request besides the tensor values: names, shapes, datatypes, "outputs",
# parameters, an id, the binary extension's JSON header. A generous constant, not a measurement.
REQUEST_OVERHEAD_BYTES = 64 * 1024
# Message fragments that repeat what a client sent are cut to this many characters.
_SHOWN_CHARS = 64


def show(value: Any) -> str:
    """A client-supplied value for an error message, as JSON, at most ~64 characters."""
    if isinstance(value, str) and len(value) > _SHOWN_CHARS:
        value = value[:_SHOWN_CHARS]
    try:
        text = json.dumps(value, separators=(",", ":"))
    except (TypeError, ValueError):  # ints beyond Python's 4300-digit str() limit, ...
        text = f"<{type(value).__name__}>"
    return text if len(text) <= _SHOWN_CHARS else text[: _SHOWN_CHARS - 3] + "..."


def show_name(name: str) -> str:
    """A client-supplied name for an error message: repr, at most ~64 characters."""
    return repr(name[:_SHOWN_CHARS]) + ("..." if len(name) > _SHOWN_CHARS else "")


def largest_elements(signature: Signature, max_rows: int | None) -> int | None:
    """How many tensor elements the largest valid request holds over all inputs, or None when a
    dynamic dimension other than a bounded batch dimension leaves it unbounded.

    ``max_rows`` bounds a dynamic first dimension (the runtime's max_batch_size, when >= 1).
    """
    total = 0
    for spec in signature.inputs:
        count = 1
        for index, dim in enumerate(spec.shape):
            if dim >= 0:
                count *= dim
            elif index == 0 and max_rows is not None:
                count *= max_rows
            else:
                return None
        total += count
    return total


def largest_request_bytes(signature: Signature, max_rows: int | None) -> int | None:
    """The size of the largest valid infer request body, or None when it is unbounded.

    Derivation: every input element costs at most ``JSON_BYTES_PER_ELEMENT`` (26) bytes as JSON
    (more than any binary element), plus ``REQUEST_OVERHEAD_BYTES`` (64 KiB) for the rest of the
    document. E.g. mnist's [1,1,28,28] FP32 input: 784 x 26 + 65536 = 85920 bytes.
    """
    elements = largest_elements(signature, max_rows)
    if elements is None:
        return None
    return elements * JSON_BYTES_PER_ELEMENT + REQUEST_OVERHEAD_BYTES


class _NotJson(ValueError):
    """NaN, Infinity and -Infinity: Python's json module reads them, JSON has no such numbers."""


def _refuse_constant(name: str) -> Any:
    raise _NotJson(f"{name} is not a JSON number")


def _loads(text: bytes) -> Any:
    if b"NaN" in text or b"Infinity" in text:  # perhaps only inside a string: check exactly
        return json.loads(text, parse_constant=_refuse_constant)
    return json.loads(text)  # the module's cached decoder: quicker than a new one per call


@dataclass(frozen=True)
class RequestedOutput:
    """One output to return; ``binary``: as binary tensor data after the JSON, not in it."""

    spec: TensorSpec
    binary: bool


@dataclass(frozen=True)
class InferRequest:
    """A validated infer request; ``outputs``: those asked for, or all of the model's."""

    id: str | None
    inputs: dict[str, Array]  # in the model's input order
    outputs: tuple[RequestedOutput, ...]


def _expected_inputs(signature: Signature) -> str:
    return ", ".join(spec.describe() for spec in signature.inputs)


def _expected_outputs(signature: Signature) -> str:
    return ", ".join(spec.describe() for spec in signature.outputs)


def _check_shape(spec: TensorSpec, shape: Any, max_rows: int | None) -> tuple[int, ...]:
    if not isinstance(shape, list) or not all(
        isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
    ):
        raise bad_request(
            f"input {spec.name!r}: shape must be a list of non-negative integers, got {show(shape)}"
        )
    # The length test comes first, so zip pairs equal-length sequences (no zip(strict=True): the
    # runtime runs on CPython 3.8, JetPack 5).
    if len(shape) != len(spec.shape) or any(
        want != -1 and want != got for want, got in zip(spec.shape, shape)
    ):
        raise bad_request(
            f"input {spec.name!r}: expected shape {format_shape(spec.shape)} (-1 = any size), "
            f"got {show(shape)}"
        )
    if max_rows is not None and spec.shape[:1] == (-1,) and shape[0] > max_rows:
        raise bad_request(
            f"input {spec.name!r}: a batch of {show(shape[0])} rows is more than this runtime's "
            f"max_batch_size ({max_rows}); split the request"
        )
    return tuple(shape)


def _count_error(spec: TensorSpec, shape: tuple[int, ...], got: int) -> ProtocolError:
    return bad_request(
        f"input {spec.name!r}: shape {show(list(shape))} needs {show(math.prod(shape))} "
        f"elements, got {got}"
    )


class ParsedNumbers:
    """A JSON array of numbers that ``loads_request`` decoded straight into numpy: the array
    ``np.asarray`` would make of the list ``json.loads`` returns (int64 or float64)."""

    __slots__ = ("array",)

    def __init__(self, array: Array) -> None:
        self.array = array


# A "data" key opening an array; the array's text up to the first "]" is a candidate when it holds
# only number characters, commas and blanks (no nesting, no strings, true, false or null).
_DATA_KEY = re.compile(rb'"data"[ \t\r\n]*:[ \t\r\n]*\[')
_NUMBER_CHARS = b"0123456789.eE+-, \t\r\n"
_MIN_FAST_BYTES = 1024  # smaller arrays: json.loads alone is as quick
_SENTINEL = "\x00edgepack-numbers-%d"


def _numbers(text: bytes) -> Array | None:
    """The comma-separated JSON numbers in ``text`` as numpy, decoding each distinct token once
    (pixels and other quantised data repeat a few values many times), or None when that would
    not be quicker or the text is not plain JSON numbers (the caller then uses json.loads)."""
    tokens = text.split(b",")
    distinct = list(set(tokens))
    if len(distinct) * 4 > len(tokens):
        return None
    try:
        values = json.loads(b"[" + b",".join(distinct) + b"]")  # strict JSON numbers
    except ValueError:
        return None
    table = np.asarray(values)
    if table.dtype.kind not in "if" or table.dtype.itemsize != 8:
        return None  # integers beyond int64: the exact, element-by-element path
    index = {token: i for i, token in enumerate(distinct)}
    positions = np.fromiter(map(index.__getitem__, tokens), dtype=np.intp, count=len(tokens))
    return table[positions]


def loads_request(body: bytes) -> Any:
    """``json.loads(body)``, where large flat number arrays under a "data" key come back as
    :class:`ParsedNumbers` rather than lists (decoding them element by element in Python is
    most of a JSON request's cost). Anything unusual falls back to plain ``json.loads``."""
    if len(body) < _MIN_FAST_BYTES:
        return _loads(body)
    pieces: list[bytes] = []
    arrays: list[Array] = []
    position = 0
    match = _DATA_KEY.search(body)
    while match is not None:
        start = match.end()
        end = body.find(b"]", start)
        if end < 0:
            break
        text = body[start:end]
        array = None
        if len(text) >= _MIN_FAST_BYTES and not text.translate(None, _NUMBER_CHARS):
            array = _numbers(text)
        if array is not None:
            sentinel = json.dumps(_SENTINEL % len(arrays)).encode()
            pieces += [body[position : start - 1], sentinel]
            position = end + 1
            arrays.append(array)
        match = _DATA_KEY.search(body, end)
    if not arrays:
        return _loads(body)
    try:
        document = _loads(b"".join([*pieces, body[position:]]))
    except ValueError:
        return _loads(body)  # the error, with positions in the body the client sent
    # Each sentinel must stand as the "data" of one input, exactly once; else decode it all.
    placed = 0
    entries = document.get("inputs") if isinstance(document, dict) else None
    for entry in entries if isinstance(entries, list) else ():
        data = entry.get("data") if isinstance(entry, dict) else None
        if isinstance(data, str) and data.startswith(_SENTINEL[:-2]):
            if placed == len(arrays) or data != _SENTINEL % placed:
                return _loads(body)
            entry["data"] = ParsedNumbers(arrays[placed])
            placed += 1
    if placed != len(arrays):
        return _loads(body)
    return document


def _from_json(spec: TensorSpec, shape: tuple[int, ...], data: Any) -> Array:
    if isinstance(data, ParsedNumbers):
        raw = data.array
    elif not isinstance(data, list):
        raise bad_request(f"input {spec.name!r}: 'data' must be a JSON array of values")
    else:
        try:
            raw = np.asarray(data)
        except (ValueError, OverflowError):
            raise bad_request(
                f"input {spec.name!r}: 'data' must be a flat (or evenly nested) list of values"
            ) from None
    if raw.size != math.prod(shape):
        raise _count_error(spec, shape, int(raw.size))
    want = spec.dtype.kind
    if raw.size and want in "iu" and raw.dtype.kind in "fO":
        # numpy falls back to float64 or object for integers beyond int64 (large UINT64 values):
        # check those element by element rather than lose precision.
        values = data.array.tolist() if isinstance(data, ParsedNumbers) else data
        raw = _exact_integers(spec, values, raw.shape)
    if raw.size:
        got = raw.dtype.kind
        if got not in "biuf":
            raise bad_request(
                f"input {spec.name!r}: 'data' must hold only {_value_word(want)} for "
                f"{spec.datatype}"
            )
        if (want == "b") != (got == "b") or (want in "iu" and got == "f"):
            raise bad_request(
                f"input {spec.name!r}: {spec.datatype} needs {_value_word(want)} in 'data'"
            )
        if want in "iu":
            limits = np.iinfo(spec.dtype)
            if int(raw.min()) < limits.min or int(raw.max()) > limits.max:
                raise bad_request(
                    f"input {spec.name!r}: values must lie in [{limits.min}, {limits.max}] "
                    f"for {spec.datatype}"
                )
    return raw.astype(spec.dtype, copy=False).reshape(shape)


def _exact_integers(spec: TensorSpec, data: list[Any], shape: tuple[int, ...]) -> Array:
    values = np.asarray(data, dtype=object).ravel().tolist()
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise bad_request(f"input {spec.name!r}: {spec.datatype} needs integers in 'data'")
    limits = np.iinfo(spec.dtype)
    if min(values) < limits.min or max(values) > limits.max:
        raise bad_request(
            f"input {spec.name!r}: values must lie in [{limits.min}, {limits.max}] "
            f"for {spec.datatype}"
        )
    return np.asarray(values, dtype=spec.dtype).reshape(shape)


def _value_word(kind: str) -> str:
    return {"b": "true/false values", "i": "integers", "u": "integers"}.get(kind, "numbers")


def _from_binary(spec: TensorSpec, shape: tuple[int, ...], blob: bytes | memoryview) -> Array:
    itemsize = spec.dtype.itemsize
    if len(blob) % itemsize:
        raise bad_request(
            f"input {spec.name!r}: binary_data_size {len(blob)} is not a multiple of "
            f"{itemsize} bytes per {spec.datatype} element"
        )
    count = len(blob) // itemsize
    if count != math.prod(shape):
        raise _count_error(spec, shape, count)
    return np.frombuffer(blob, dtype=spec.dtype).reshape(shape)


def _parameters(entry: dict[str, Any], where: str) -> dict[str, Any]:
    parameters = entry.get("parameters", {})
    if not isinstance(parameters, dict):
        raise bad_request(f"{where}: 'parameters' must be a JSON object")
    return parameters


def _binary_size(parameters: dict[str, Any], where: str) -> int | None:
    size = parameters.get("binary_data_size")
    if size is None:
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise bad_request(f"{where}: binary_data_size must be a non-negative integer")
    return size


def parse_infer_request(
    body: bytes,
    header_length: int | None,
    signature: Signature,
    *,
    max_rows: int | None = None,
    max_elements: int | None = None,
) -> InferRequest:
    """Validate an infer request against the model signature.

    ``header_length`` is the value of the Inference-Header-Content-Length header: the JSON part's
    size when binary tensors follow it, or None for a pure JSON body. ``max_rows`` bounds a
    dynamic batch dimension (max_batch_size); ``max_elements`` (see ``largest_elements``) bounds
    the values the JSON part may hold, checked before it is decoded, so that a body of short
    numbers ("0,0,0,...") cannot make the decoder build far more objects than a valid request.
    All errors are ProtocolError(400) with a short message.
    """
    if header_length is not None and not 0 <= header_length <= len(body):
        raise bad_request(
            f"{HEADER_LENGTH} is {header_length} but the body has only {len(body)} bytes"
        )
    view = memoryview(body)
    head = bytes(view[:header_length]) if header_length is not None else body
    # Every value after an array's first is preceded by a comma: the count bounds the values.
    if max_elements is not None and head.count(b",") > max_elements + REQUEST_OVERHEAD_BYTES:
        raise bad_request(
            f"the request holds more values than the model's inputs take ({max_elements})"
        )
    try:
        document = loads_request(head)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        if isinstance(exc, json.JSONDecodeError):
            detail = exc.msg
        elif isinstance(exc, _NotJson):
            detail = str(exc)
        elif isinstance(exc, RecursionError):
            detail = "nested too deeply"
        elif isinstance(exc, UnicodeDecodeError):
            detail = "not UTF-8"
        else:  # an integer beyond Python's digit limit, ...
            detail = "a number is out of range"
        raise bad_request(f"malformed JSON request: {detail}") from None
    if not isinstance(document, dict):
        raise bad_request("the request must be a JSON object with an 'inputs' array")
    request_id = document.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > 1024):
        raise bad_request("'id' must be a string of at most 1024 characters")
    entries = document.get("inputs")
    if not isinstance(entries, list) or not entries:
        raise bad_request(
            f"the request needs a non-empty 'inputs' array; expected: {_expected_inputs(signature)}"
        )

    offset = header_length if header_length is not None else len(body)
    arrays: dict[str, Array] = {}
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad_request(f"inputs[{index}] must be an object with a string 'name'")
        name = entry["name"]
        spec = signature.input(name)
        if spec is None:
            raise bad_request(
                f"unknown input {show_name(name)}; the model's inputs are: "
                f"{_expected_inputs(signature)}"
            )
        if name in arrays:
            raise bad_request(f"input {name!r} is given twice")
        if entry.get("datatype") != spec.datatype:
            raise bad_request(
                f"input {name!r}: expected datatype {spec.datatype}, got "
                f"{show(entry.get('datatype'))}"
            )
        shape = _check_shape(spec, entry.get("shape"), max_rows)
        size = _binary_size(_parameters(entry, f"input {name!r}"), f"input {name!r}")
        if size is not None:
            if "data" in entry:
                raise bad_request(f"input {name!r}: give either 'data' or binary_data_size")
            if offset + size > len(body):
                raise bad_request(
                    f"input {name!r}: binary_data_size {show(size)} runs past the end of the body"
                )
            arrays[name] = _from_binary(spec, shape, view[offset : offset + size])
            offset += size
        elif "data" in entry:
            arrays[name] = _from_json(spec, shape, entry["data"])
        else:
            raise bad_request(f"input {name!r}: needs 'data' (or binary_data_size)")
    if offset != len(body):
        raise bad_request(
            f"the body has {len(body) - offset} bytes after the JSON header and binary inputs"
        )
    missing = [spec.describe() for spec in signature.inputs if spec.name not in arrays]
    if missing:
        raise bad_request(f"missing input {', '.join(missing)}")

    parameters = _parameters(document, "request")
    binary_default = parameters.get("binary_data_output", False)
    if not isinstance(binary_default, bool):
        raise bad_request("parameters.binary_data_output must be true or false")
    outputs = _requested_outputs(document.get("outputs"), signature, binary_default)
    ordered = {spec.name: arrays[spec.name] for spec in signature.inputs}
    return InferRequest(request_id, ordered, outputs)


def _requested_outputs(
    entries: Any, signature: Signature, binary_default: bool
) -> tuple[RequestedOutput, ...]:
    if entries is None:
        return tuple(RequestedOutput(spec, binary_default) for spec in signature.outputs)
    if not isinstance(entries, list):
        raise bad_request("'outputs' must be an array of {\"name\": ...} objects")
    requested: list[RequestedOutput] = []
    seen: set[str] = set()
    for index, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("name"), str):
            raise bad_request(f"outputs[{index}] must be an object with a string 'name'")
        spec = signature.output(entry["name"])
        if spec is None:
            raise bad_request(
                f"unknown output {show_name(entry['name'])}; the model's outputs are: "
                f"{_expected_outputs(signature)}"
            )
        # Each repetition would be computed and encoded again: one name, one output.
        if spec.name in seen:
            raise bad_request(f"output {spec.name!r} is requested twice")
        seen.add(spec.name)
        parameters = _parameters(entry, f"output {spec.name!r}")
        if "classification" in parameters:
            raise bad_request(f"output {spec.name!r}: the classification extension is not served")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise bad_request(f"output {spec.name!r}: parameters.binary_data must be true or false")
        requested.append(RequestedOutput(spec, binary))
    if not requested:
        raise bad_request(
            f"'outputs' is empty; the model's outputs are: {_expected_outputs(signature)}"
        )
    return tuple(requested)


def encode_infer_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: Sequence[RequestedOutput],
    results: Sequence[Array],
) -> tuple[bytes, int | None]:
    """The response body and, when binary outputs follow the JSON, the JSON part's length."""
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    # An explicit check, not zip(strict=True): the runtime runs on CPython 3.8 (JetPack 5).
    if len(outputs) != len(results):
        raise ValueError(f"{len(outputs)} outputs requested but {len(results)} results")
    for requested, result in zip(outputs, results):
        spec = requested.spec
        entry: dict[str, Any] = {
            "name": spec.name,
            "datatype": spec.datatype,
            "shape": list(result.shape),
        }
        if requested.binary:
            blob = np.ascontiguousarray(result, dtype=spec.dtype).tobytes()
            entry["parameters"] = {"binary_data_size": len(blob)}
            blobs.append(blob)
        else:
            values = np.asarray(result, dtype=spec.dtype)
            if values.dtype.kind == "f" and not np.isfinite(values).all():
                # JSON has no NaN or Infinity (json.dumps would write invalid JSON);
                # the binary extension carries them as IEEE 754 bits.
                raise bad_request(
                    f"output {spec.name!r} holds NaN or infinite values, which JSON cannot "
                    "carry; request it as binary data (parameters.binary_data: true)"
                )
            entry["data"] = values.ravel().tolist()
        entries.append(entry)
    document: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        document["id"] = request_id
    document["outputs"] = entries
    header = json.dumps(document, separators=(",", ":")).encode()
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)
