import json

import numpy as np
import pytest

from kiln.server.codec import BadRequest, decode_request, encode_response, split_body
from kiln.spec import TensorSpec

IMG = [TensorSpec("image", "float32", ("batch", 2))]
OUT = [TensorSpec("logits", "float32", ("batch", 3))]


def decode(body: bytes, header: str | None = None, **kw: object) -> object:
    doc, tail = split_body(body, header)
    return decode_request(doc, tail, IMG, OUT, batched=True, **kw)  # type: ignore[arg-type]


def req(**tensor: object) -> bytes:
    t = {"name": "image", "datatype": "FP32", "shape": [2, 2], "data": [1, 2, 3, 4], **tensor}
    return json.dumps({"inputs": [t]}).encode()


def test_json_flat_and_nested() -> None:
    for data in ([1, 2, 3, 4], [[1, 2], [3, 4]]):
        d = decode(req(data=data))
        np.testing.assert_array_equal(d.arrays[0], [[1, 2], [3, 4]])  # type: ignore[attr-defined]
        assert d.arrays[0].dtype == np.float32 and d.rows == 2  # type: ignore[attr-defined]


def test_the_api_dtype_rule_float64_in_float32_out() -> None:
    """Same rule as kiln.runner: any float datatype for a float input, any integer one that fits for an int input."""
    d = decode(req(datatype="FP64"))
    assert d.arrays[0].dtype == np.float32  # type: ignore[attr-defined]
    x = np.arange(4, dtype=np.float64).reshape(2, 2)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP64", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 32}}]}).encode()
    np.testing.assert_array_equal(decode(head + x.tobytes(), str(len(head))).arrays[0], x)  # type: ignore[attr-defined]
    ids = [TensorSpec("ids", "int32", ("batch", 2))]
    body = json.dumps({"inputs": [{"name": "ids", "datatype": "INT64", "shape": [1, 2], "data": [1, 2]}]}).encode()
    doc, tail = split_body(body, None)
    assert decode_request(doc, tail, ids, OUT, batched=True).arrays[0].dtype == np.int32
    doc, tail = split_body(body.replace(b"[1, 2]}", b"[1, 4294967296]}"), None)
    with pytest.raises(BadRequest, match=r"INT64 values 1..4294967296 do not fit"):
        decode_request(doc, tail, ids, OUT, batched=True)


def test_binary_round_trip() -> None:
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 16}}],
                       "outputs": [{"name": "logits", "parameters": {"binary_data": True}}]}).encode()
    d = decode(head + x.tobytes(), str(len(head)))
    np.testing.assert_array_equal(d.arrays[0], x)  # type: ignore[attr-defined]
    body, n = encode_response("m", "1", "r1", ["logits"], [np.ones((2, 3), np.float32)], OUT, d.binary)  # type: ignore[attr-defined]
    assert n is not None and json.loads(body[:n])["outputs"][0]["parameters"]["binary_data_size"] == 24
    np.testing.assert_array_equal(np.frombuffer(body[n:], np.float32), np.ones(6))


@pytest.mark.parametrize("body,header,needle", [
    (b"{not json", None, "malformed JSON"),
    (b"[1,2]", None, "must be a JSON object"),
    (b'{"inputs": []}', None, "non-empty list"),
    (req(name="pixels"), None, "unknown ['pixels'], missing ['image']"),
    (req(datatype="INT64"), None, "it takes any of FP16/FP32/FP64, got 'INT64'"),
    (req(datatype="FP64", data=[1, 2, 3, 1e300]), None, "NaN or infinity"),  # does not fit in FP32
    (req(shape=[4]), None, "add a batch dimension"),
    (req(shape=[2, 3], data=[1] * 6), None, 'expected input "image" FP32[batch,2], got shape [2, 3]'),
    (req(data=[1, 2, 3]), None, "has 4 elements but \"data\" has 3"),
    (req(data=["a", "b", "c", "d"]), None, "must be a flat or nested list"),
    (req(data=[1, float("nan"), 3, 4]).replace(b"NaN", b"NaN"), None, "malformed JSON"),
    (req(shape=[0, 2], data=[]), None, "empty 'batch' dimension"),
    (req(shape=[2, -2]), None, "non-negative integers"),
    (req(), "9999", "outside the body"),
    (req(), "x", "must be an integer"),
])
def test_bad_requests(body: bytes, header: str | None, needle: str) -> None:
    with pytest.raises(BadRequest) as e:
        decode(body, header)
    assert needle in str(e.value) and e.value.status == 400


def test_nan_policy_and_binary_sizes() -> None:
    x = np.array([[1, np.nan], [3, 4]], np.float32)
    head = json.dumps({"inputs": [{"name": "image", "datatype": "FP32", "shape": [2, 2],
                                   "parameters": {"binary_data_size": 16}}]}).encode()
    with pytest.raises(BadRequest, match="NaN or infinity"):
        decode(head + x.tobytes(), str(len(head)))
    assert np.isnan(decode(head + x.tobytes(), str(len(head)), allow_nonfinite=True).arrays[0]).any()  # type: ignore[attr-defined]
    with pytest.raises(BadRequest, match="ends after 8 of 16 bytes"):
        decode(head + x.tobytes()[:8], str(len(head)))
    ok = np.ones((2, 2), np.float32).tobytes()
    with pytest.raises(BadRequest, match="not claimed"):
        decode(head + ok + b"xx", str(len(head)))
    bad = head.replace(b"16", b"12")
    with pytest.raises(BadRequest, match="needs 16 bytes"):
        decode(bad + x.tobytes()[:12], str(len(bad)))


BIG = [TensorSpec("image", "float32", ("batch", 1024))]


@pytest.mark.parametrize("data", [
    "floats", "ints", "mixed", "nested", "bools", "strings", "nulls", "ragged", "one-number arrays",
])
def test_large_json_bodies_decode_as_orjson_would(monkeypatch: pytest.MonkeyPatch, data: str) -> None:
    """Bodies past FAST_JSON_BYTES take simdjson's path (floats straight into numpy): same arrays, same refusals."""
    from kiln.server import codec

    x = np.random.default_rng(0).standard_normal((2, 1024))
    values: object = {"floats": x.ravel().tolist(), "ints": list(range(2048)), "mixed": [1, *x.ravel()[1:].tolist()],
                      "nested": x.tolist(), "bools": [True] * 2048, "strings": ["1.0"] * 2048, "nulls": [None] * 2048,
                      "ragged": [x[0].tolist(), x[1, :10].tolist()],
                      "one-number arrays": [[v] for v in x.ravel().tolist()]}[data]
    body = json.dumps({"inputs": [{"name": "image", "datatype": "FP64", "shape": [2, 1024], "data": values}],
                       "id": "r", "parameters": {"binary_data_output": False}}).encode()
    assert len(body) > codec.FAST_JSON_BYTES

    def outcome() -> object:
        doc, tail = split_body(body, None)
        try:
            d = decode_request(doc, tail, BIG, OUT, batched=True)
        except BadRequest as e:
            return str(e)
        return d.arrays[0].tobytes(), d.id, d.rows

    if codec.simdjson is None:
        pytest.skip("pysimdjson is not installed: only orjson's path exists")
    took_fast = isinstance(split_body(body, None)[0]["inputs"][0]["data"], np.ndarray)
    assert took_fast == (data in ("floats", "ints", "mixed"))  # flat arrays of numbers only
    fast = outcome()
    monkeypatch.setattr(codec, "simdjson", None)
    assert fast == outcome()
