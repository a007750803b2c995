"""Request parsing and response encoding against synthetic signatures (no model, no sockets)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from packager.runtime.model import DATATYPES, Signature, TensorSpec
from packager.runtime.protocol import (
    JSON_BYTES_PER_ELEMENT,
    ParsedNumbers,
    ProtocolError,
    RequestedOutput,
    encode_infer_response,
    largest_elements,
    largest_request_bytes,
    loads_request,
    parse_infer_request,
    show,
)

SPECS = {
    datatype: TensorSpec(f"x_{datatype}", datatype, (-1, 2), dtype)
    for datatype, dtype in DATATYPES.values()
}


def signature(*datatypes: str) -> Signature:
    specs = tuple(SPECS[d] for d in datatypes)
    outputs = tuple(TensorSpec(f"y_{s.datatype}", s.datatype, s.shape, s.dtype) for s in specs)
    return Signature(specs, outputs)


def body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return json.dumps({"inputs": list(inputs), **extra}).encode()


def tensor(datatype: str, data: Any, shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": f"x_{datatype}", "datatype": datatype, "shape": shape or [2, 2], "data": data}


SAMPLES: dict[str, list[Any]] = {
    "FP32": [0.5, -1.0, 3, 1e30],
    "FP16": [0.5, -1.0, 2.0, 65504.0],
    "FP64": [0.1, -1e300, 3.0, 4.0],
    "INT8": [-128, 127, 0, 1],
    "INT16": [-32768, 32767, 0, 1],
    "INT32": [-(2**31), 2**31 - 1, 0, 1],
    "INT64": [-(2**63), 2**63 - 1, 0, 1],
    "UINT8": [0, 255, 1, 2],
    "UINT16": [0, 65535, 1, 2],
    "UINT32": [0, 2**32 - 1, 1, 2],
    "UINT64": [0, 2**63, 1, 2],
    "BOOL": [True, False, False, True],
}


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_json_tensors_of_every_dtype_round_trip(datatype: str) -> None:
    spec = SPECS[datatype]
    request = parse_infer_request(
        body(tensor(datatype, SAMPLES[datatype])), None, signature(datatype)
    )
    array = request.inputs[spec.name]
    assert array.dtype == spec.dtype
    assert array.shape == (2, 2)
    np.testing.assert_array_equal(array.ravel(), np.asarray(SAMPLES[datatype], dtype=spec.dtype))
    out = request.outputs[0]
    payload, header_length = encode_infer_response("m", "1", None, [out], [array])
    assert header_length is None
    document = json.loads(payload)
    assert document["outputs"][0]["datatype"] == datatype
    assert document["outputs"][0]["shape"] == [2, 2]
    np.testing.assert_array_equal(
        np.asarray(document["outputs"][0]["data"], dtype=spec.dtype), array.ravel()
    )


@pytest.mark.parametrize("datatype", sorted(SAMPLES))
def test_binary_tensors_of_every_dtype_round_trip(datatype: str) -> None:
    spec = SPECS[datatype]
    array = np.asarray(SAMPLES[datatype], dtype=spec.dtype).reshape(2, 2)
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": spec.name,
                    "datatype": datatype,
                    "shape": [2, 2],
                    "parameters": {"binary_data_size": array.nbytes},
                }
            ],
            "parameters": {"binary_data_output": True},
        }
    ).encode()
    request = parse_infer_request(header + array.tobytes(), len(header), signature(datatype))
    np.testing.assert_array_equal(request.inputs[spec.name], array)
    assert request.outputs[0].binary
    payload, header_length = encode_infer_response("m", "1", "id", request.outputs, [array])
    assert header_length is not None
    document = json.loads(payload[:header_length])
    assert document["id"] == "id"
    assert document["outputs"][0]["parameters"] == {"binary_data_size": array.nbytes}
    decoded = np.frombuffer(payload[header_length:], dtype=spec.dtype).reshape(2, 2)
    np.testing.assert_array_equal(decoded, array)


@pytest.mark.parametrize(
    ("datatype", "data", "message"),
    [
        ("UINT8", [0, 256, 1, 2], "values must lie in [0, 255] for UINT8"),
        ("INT8", [-129, 0, 1, 2], "values must lie in [-128, 127] for INT8"),
        ("INT64", [0.5, 0, 1, 2], "INT64 needs integers in 'data'"),
        ("BOOL", [1, 0, 1, 0], "BOOL needs true/false values in 'data'"),
        ("FP32", [True, False, True, False], "FP32 needs numbers in 'data'"),
        ("FP32", [[1, 2], [3]], "flat (or evenly nested) list"),
        ("FP32", [None, 1, 2, 3], "must hold only numbers for FP32"),
        ("FP32", "1,2,3,4", "'data' must be a JSON array"),
        ("FP32", [1, 2, 3], "shape [2,2] needs 4 elements, got 3"),
    ],
)
def test_json_data_is_checked_against_the_datatype(datatype: str, data: Any, message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_infer_request(body(tensor(datatype, data)), None, signature(datatype))
    assert caught.value.status == 400
    assert message in caught.value.message


def test_nested_json_data_is_accepted() -> None:
    request = parse_infer_request(body(tensor("FP32", [[1, 2], [3, 4]])), None, signature("FP32"))
    assert request.inputs["x_FP32"].tolist() == [[1, 2], [3, 4]]


def test_dynamic_dimension_accepts_any_size_but_rank_is_fixed() -> None:
    sig = signature("FP32")
    request = parse_infer_request(body(tensor("FP32", [0.0] * 6, [3, 2])), None, sig)
    assert request.inputs["x_FP32"].shape == (3, 2)
    with pytest.raises(ProtocolError, match=r"expected shape \[-1,2\]"):
        parse_infer_request(body(tensor("FP32", [0.0] * 6, [3, 2, 1])), None, sig)


def test_binary_size_must_fit_the_dtype_and_body() -> None:
    sig = signature("FP32")
    header = json.dumps(
        {
            "inputs": [
                {
                    "name": "x_FP32",
                    "datatype": "FP32",
                    "shape": [1, 2],
                    "parameters": {"binary_data_size": 7},
                }
            ]
        }
    ).encode()
    with pytest.raises(ProtocolError, match="not a multiple of 4 bytes per FP32 element"):
        parse_infer_request(header + b"\0" * 7, len(header), sig)
    header = header.replace(b'"binary_data_size": 7', b'"binary_data_size": 8')
    with pytest.raises(ProtocolError, match="the body has 1 bytes after the JSON header"):
        parse_infer_request(header + b"\0" * 9, len(header), sig)


def test_missing_input_lists_what_is_expected() -> None:
    sig = signature("FP32", "INT64")
    with pytest.raises(ProtocolError, match=r"missing input x_INT64 \(INT64 \[-1,2\]\)"):
        parse_infer_request(body(tensor("FP32", [0.0] * 4)), None, sig)


def test_inputs_are_returned_in_model_order_and_outputs_default_to_all() -> None:
    sig = signature("FP32", "INT64")
    request = parse_infer_request(
        body(tensor("INT64", [1, 2, 3, 4]), tensor("FP32", [0.0] * 4)), None, sig
    )
    assert list(request.inputs) == ["x_FP32", "x_INT64"]
    assert request.outputs == tuple(RequestedOutput(spec, False) for spec in sig.outputs)


def test_per_output_binary_flag_overrides_the_request_default() -> None:
    sig = signature("FP32", "INT64")
    request = parse_infer_request(
        body(
            tensor("FP32", [0.0] * 4),
            tensor("INT64", [1, 2, 3, 4]),
            outputs=[{"name": "y_INT64", "parameters": {"binary_data": True}}, {"name": "y_FP32"}],
            parameters={"binary_data_output": False},
        ),
        None,
        sig,
    )
    assert [(o.spec.name, o.binary) for o in request.outputs] == [
        ("y_INT64", True),
        ("y_FP32", False),
    ]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"inputs": [], "id": "x"}, "non-empty 'inputs' array"),
        ({"inputs": [tensor("FP32", [0.0] * 4)], "id": 7}, "'id' must be a string"),
        ({"inputs": ["x_FP32"]}, "inputs[0] must be an object with a string 'name'"),
        ({"inputs": [tensor("FP32", [0.0] * 4)], "outputs": []}, "'outputs' is empty"),
        (
            {
                "inputs": [tensor("FP32", [0.0] * 4)],
                "outputs": [{"name": "y_FP32", "parameters": {"classification": 3}}],
            },
            "classification extension is not served",
        ),
        (
            {"inputs": [tensor("FP32", [0.0] * 4)], "parameters": {"binary_data_output": 1}},
            "binary_data_output must be true or false",
        ),
    ],
)
def test_request_structure_errors(document: dict[str, Any], message: str) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_infer_request(json.dumps(document).encode(), None, signature("FP32"))
    assert message in caught.value.message


# ---- loads_request: the fast path for large JSON number arrays must equal json.loads exactly ----


def _plain(document: Any) -> Any:
    """ParsedNumbers as the (dtype, values) np.asarray makes of json.loads's list; lists of plain
    numbers the same way, so that both decodings compare equal."""
    if isinstance(document, ParsedNumbers):
        return (document.array.dtype.str, document.array.tolist())
    if isinstance(document, list):
        if document and all(type(v) in (int, float) for v in document):
            array = np.asarray(document)
            if array.dtype.kind in "if" and array.dtype.itemsize == 8:
                return (array.dtype.str, array.tolist())
        return [_plain(v) for v in document]
    if isinstance(document, dict):
        return {k: _plain(v) for k, v in document.items()}
    return document


def _array(tokens: list[str], count: int = 600, separator: str = ",") -> str:
    return "[" + separator.join(tokens[i % len(tokens)] for i in range(count)) + "]"


def _doc(template: str, *arrays: str) -> str:
    """``template`` with each ``ARR`` replaced by the next of ``arrays``."""
    for array in arrays:
        template = template.replace("ARR", array, 1)
    return template


ONE = '{"inputs":[{"name":"x","data":ARR}]}'
PIXELS = [f"{v}.0" for v in range(0, 256, 7)]
FAST_CASES = {
    "pixels": _doc(ONE, _array(PIXELS)),
    "spaced": _doc('{"inputs": [{"name": "x", "data" : ARR}]}', _array(PIXELS, separator=", ")),
    "integers": _doc(ONE, _array(["0", "1", "-7", "255"])),
    "mixed": _doc(ONE, _array(["1", "2.5", "1e3", "-0", "3E-2"])),
    "two-inputs": _doc(
        '{"inputs":[{"name":"a","data":ARR},{"name":"b","data":ARR}],"id":"r"}',
        _array(PIXELS),
        _array(["1", "2"]),
    ),
}
FALLBACK_CASES = {
    "few-repeats": _doc(ONE, _array([str(i / 7) for i in range(600)])),
    "huge-integers": _doc(ONE, _array(["1", str(2**64 - 1)])),
    "elsewhere": _doc(
        '{"parameters":{"data":ARR},"inputs":[{"name":"x","data":ARR}]}',
        _array(PIXELS),
        _array(PIXELS),
    ),
    "duplicate-key": _doc(
        '{"inputs":[{"name":"x","data":ARR,"data":ARR}]}', _array(PIXELS), _array(["1"])
    ),
    "nested": _doc('{"inputs":[{"name":"x","data":[ARR,ARR]}]}', _array(PIXELS), _array(PIXELS)),
    "sentinel-lookalike": _doc(
        '{"id":"\\u0000edgepack-numbers-0","inputs":[{"name":"x","data":ARR}]}', _array(PIXELS)
    ),
}
MALFORMED_CASES = {
    "empty-token": _doc(ONE, _array(["1", "", "2"])),
    "leading-plus": _doc(ONE, _array(["1", "+1"])),
    "leading-zero": _doc(ONE, _array(["1", "01"])),
    "bare-dot": _doc(ONE, _array(["1", ".5"])),
    "truncated": _doc('{"inputs":[{"name":"x","data":ARR}', _array(PIXELS)),
}


@pytest.mark.parametrize("text", FAST_CASES.values(), ids=list(FAST_CASES))
def test_large_number_arrays_decode_straight_to_numpy_as_json_would(text: str) -> None:
    document = loads_request(text.encode())
    assert all(isinstance(entry["data"], ParsedNumbers) for entry in document["inputs"])
    assert _plain(document) == _plain(json.loads(text))


@pytest.mark.parametrize("text", FALLBACK_CASES.values(), ids=list(FALLBACK_CASES))
def test_unusual_arrays_fall_back_to_json_loads(text: str) -> None:
    assert _plain(loads_request(text.encode())) == _plain(json.loads(text))


@pytest.mark.parametrize("text", MALFORMED_CASES.values(), ids=list(MALFORMED_CASES))
def test_malformed_arrays_raise_what_json_loads_raises(text: str) -> None:
    with pytest.raises(json.JSONDecodeError) as expected:
        json.loads(text)
    with pytest.raises(json.JSONDecodeError) as got:
        loads_request(text.encode())
    assert str(got.value) == str(expected.value)


def test_fast_path_arrays_are_validated_like_lists() -> None:
    sig = signature("FP32", "INT64")
    pixels = [float(i % 50) for i in range(600)]
    request = parse_infer_request(
        body(
            tensor("FP32", pixels, [300, 2]),
            tensor("INT64", [i % 9 for i in range(600)], [300, 2]),
        ),
        None,
        sig,
    )
    np.testing.assert_array_equal(
        request.inputs["x_FP32"].ravel(), np.asarray(pixels, dtype=np.float32)
    )
    assert request.inputs["x_INT64"].dtype == np.dtype("<i8")
    with pytest.raises(ProtocolError, match="INT64 needs integers"):
        parse_infer_request(body(tensor("INT64", pixels[:1] + [0.5] * 599, [300, 2])), None, sig)
    with pytest.raises(ProtocolError, match="needs 600 elements, got 598"):
        parse_infer_request(body(tensor("FP32", pixels[:598], [300, 2])), None, sig)


# ---- bounds (issue 9) ---------------------------------------------------------------------------


def test_largest_request_is_26_bytes_per_element_plus_64_kib() -> None:
    mnist = Signature((TensorSpec("x", "FP32", (1, 1, 28, 28), np.dtype("<f4")),), ())
    assert largest_request_bytes(mnist, None) == 784 * 26 + 65536
    batched = signature("FP32", "INT8")  # two inputs of [-1, 2]
    assert largest_elements(batched, 4) == 16
    assert largest_request_bytes(batched, 4) == 16 * 26 + 65536
    assert largest_request_bytes(batched, None) is None  # an unbounded batch: the cap applies
    inner = Signature((TensorSpec("x", "FP32", (1, -1), np.dtype("<f4")),), ())
    assert largest_request_bytes(inner, 8) is None  # only a first dimension is a batch


def test_the_longest_json_numbers_fit_the_per_element_allowance() -> None:
    longest = [-2.2250738585072014e-308, -(2**63), -1.7976931348623157e308, 2**64 - 1]
    for value in longest:
        separator = len(json.dumps([value, value])) - 2 - 2 * len(json.dumps(value))
        assert len(json.dumps(value)) + separator <= JSON_BYTES_PER_ELEMENT


def test_a_batch_above_max_rows_is_refused() -> None:
    sig = signature("FP32")
    parse_infer_request(body(tensor("FP32", [0.0] * 8, [4, 2])), None, sig, max_rows=4)
    with pytest.raises(ProtocolError, match=r"a batch of 5 rows is more than .* \(4\)"):
        parse_infer_request(body(tensor("FP32", [0.0] * 10, [5, 2])), None, sig, max_rows=4)


def test_more_values_than_the_largest_request_are_refused_before_decoding() -> None:
    sig = signature("FP32")
    elements = largest_elements(sig, 2)
    assert elements == 4
    too_many = body(tensor("FP32", [0] * (4 + 65536 + 10), [2, 2]))
    with pytest.raises(ProtocolError, match=r"more values than the model's inputs take \(4\)"):
        parse_infer_request(too_many, None, sig, max_rows=2, max_elements=elements)


def test_an_output_requested_twice_is_refused() -> None:
    sig = signature("FP32")
    request = body(tensor("FP32", [0.0] * 4), outputs=[{"name": "y_FP32"}] * 2)
    with pytest.raises(ProtocolError, match="output 'y_FP32' is requested twice"):
        parse_infer_request(request, None, sig)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"inputs": [{"data": [NaN]}]}', "NaN is not a JSON number"),
        (b'{"inputs": [{"data": [-Infinity]}]}', "-Infinity is not a JSON number"),
        (b'{"inputs": [' + b"1" * 5000 + b"]}", "a number is out of range"),
        (b'{"inputs": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", "nested too deeply"),
    ],
    ids=["nan", "infinity", "5000-digits", "100k-deep"],
)
def test_what_is_not_json_is_a_400(text: bytes, message: str) -> None:
    with pytest.raises(ProtocolError) as refused:
        parse_infer_request(text, None, signature("FP32"))
    assert refused.value.status == 400
    assert refused.value.message == f"malformed JSON request: {message}"


def test_error_messages_quote_client_values_briefly() -> None:
    sig = signature("FP32")
    long_name = "n" * 100_000
    with pytest.raises(ProtocolError) as refused:
        parse_infer_request(body({**tensor("FP32", [0.0] * 4), "name": long_name}), None, sig)
    assert len(refused.value.message) < 200
    with pytest.raises(ProtocolError) as refused:
        parse_infer_request(body(tensor("FP32", [0.0] * 4, [10**4000, 2])), None, sig)
    assert len(refused.value.message) < 300
    assert len(show("x" * 1000)) <= 64 and len(show(list(range(1000)))) <= 64


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_outputs_are_refused_as_json_and_kept_as_binary(value: float) -> None:
    spec = SPECS["FP32"]
    result = np.asarray([[value, 1.0]], dtype=np.float32)
    with pytest.raises(ProtocolError, match="holds NaN or infinite values"):
        encode_infer_response("m", "1", None, [RequestedOutput(spec, binary=False)], [result])
    payload, header = encode_infer_response(
        "m", "1", None, [RequestedOutput(spec, binary=True)], [result]
    )
    assert header is not None
    assert np.frombuffer(payload[header:], dtype="<f4").tobytes() == result.tobytes()
