"""V2 tensors to and from numpy: JSON data and the binary tensor data extension, validated against TensorSpecs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson

from kiln.spec import TensorSpec, layout_hint, out_of_range

try:  # JSON tensors straight into numpy (see _parse_json); orjson alone where pysimdjson is missing
    import simdjson
except ImportError:  # pragma: no cover - a dependency; the fallback keeps any install working
    simdjson = None  # type: ignore[assignment]

DATATYPES = {
    "float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "float64": "FP64", "int64": "INT64",
    "int32": "INT32", "int16": "INT16", "int8": "INT8", "uint8": "UINT8", "bool": "BOOL",
}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "FP64": np.float64, "INT64": np.int64, "INT32": np.int32,
         "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8, "BOOL": np.bool_, "UINT16": np.uint16,
         "UINT32": np.uint32, "UINT64": np.uint64}
HEADER_LENGTH = "inference-header-content-length"
_FLOATS = ("FP16", "FP32", "FP64")
_INTS = ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64")


class BadRequest(Exception):
    """A client error: answered with HTTP 400 (or `status`) and this message."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status
        self.request_id: str | None = None


@dataclass
class Decoded:
    """A validated inference request: arrays in spec order, and how the client wants outputs back."""

    id: str | None
    arrays: list[np.ndarray]
    rows: int
    outputs: list[str]
    binary: set[str]
    parameters: dict[str, Any]


def split_body(body: bytes, header_length: str | None) -> tuple[Any, memoryview]:
    """JSON header and binary tail of a request body (the tail is empty without the binary extension)."""
    if header_length is None:
        n = len(body)
    else:
        try:
            n = int(header_length)
        except ValueError:
            raise BadRequest(f"Inference-Header-Content-Length must be an integer, got {header_length!r}") from None
        if not 0 < n <= len(body):
            raise BadRequest(f"Inference-Header-Content-Length {n} is outside the body's {len(body)} bytes")
    doc = _parse_json(body[:n] if n < len(body) else body)
    if not isinstance(doc, dict):
        raise BadRequest("the request body must be a JSON object with an 'inputs' list")
    return doc, memoryview(body)[n:]


FAST_JSON_BYTES = 4096  # below this, orjson's Python objects cost less than the detour


def _parse_json(raw: bytes) -> Any:
    """The request document. Large bodies go through simdjson: each input's flat float `data` array comes out as
    one float64 numpy array, with no Python float per element (orjson + np.asarray took 1.7 times as long on a
    3,072-float tensor). Anything else in the document (and any `data` that is nested, or not all numbers) is converted
    as orjson would, so what is accepted and refused stays the same, with one leniency: a flat array that holds
    one-number arrays after its first element (`[1.0, [2.0]]`) reads as flat rather than being refused."""
    if simdjson is None or len(raw) < FAST_JSON_BYTES:
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise BadRequest(f"malformed JSON: {e}; send a V2 inference request object") from None
    try:
        top = simdjson.Parser().parse(raw)
    except (ValueError, RuntimeError) as e:  # simdjson's parse errors (depth: RuntimeError); orjson says where
        try:
            orjson.loads(raw)
        except orjson.JSONDecodeError as e2:
            raise BadRequest(f"malformed JSON: {e2}; send a V2 inference request object") from None
        raise BadRequest(f"malformed JSON: {e}; send a V2 inference request object") from None
    if not isinstance(top, simdjson.Object):
        return _plain(top)
    doc = {k: _plain(top[k]) for k in top.keys() if k != "inputs"}
    if "inputs" in top:
        items = top["inputs"]
        doc["inputs"] = [_input(t) for t in items] if isinstance(items, simdjson.Array) else _plain(items)
    return doc


def _plain(v: Any) -> Any:
    return v.as_dict() if isinstance(v, simdjson.Object) else v.as_list() if isinstance(v, simdjson.Array) else v


def _input(t: Any) -> Any:
    if not isinstance(t, simdjson.Object):
        return _plain(t)
    d = {k: _plain(t[k]) for k in t.keys() if k != "data"}
    if "data" in t:
        data = t["data"]
        if isinstance(data, simdjson.Array) and d.get("datatype") in _FLOATS and len(data) > 0 \
                and not isinstance(data[0], simdjson.Array):
            try:
                a = np.frombuffer(data.as_buffer(of_type="d"), dtype=np.float64)
            except (TypeError, ValueError):  # not all numbers: the list form, refused or converted as before
                a = None
            if a is not None and a.size == len(data):  # as_buffer flattens arrays inside; the list form refuses them
                d["data"] = a
                return d
        d["data"] = _plain(data)
    return d


def decode_request(doc: dict[str, Any], tail: memoryview, inputs: list[TensorSpec], outputs: list[TensorSpec],
                   *, batched: bool, allow_nonfinite: bool = False) -> Decoded:
    """Check every input against its spec: name, datatype, shape, element count vs binary size, NaN/inf."""
    items = doc.get("inputs")
    if not isinstance(items, list) or not items:
        raise BadRequest("'inputs' must be a non-empty list of tensors")
    by_name: dict[str, dict[str, Any]] = {}
    for t in items:
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise BadRequest("each input must be an object with a 'name'")
        if t["name"] in by_name:
            raise BadRequest(f"input {t['name']!r} appears twice")
        by_name[t["name"]] = t
    names = [s.name for s in inputs]
    unknown = [n for n in by_name if n not in names]
    missing = [n for n in names if n not in by_name]
    if unknown or missing:
        raise BadRequest(f"inputs do not match the model: unknown {unknown}, missing {missing}; the model takes {names}")
    offset = 0
    arrays = []
    sizes: dict[str, int] = {}
    for spec in inputs:
        a, offset = _decode_tensor(by_name[spec.name], spec, tail, offset)
        _check_shape(spec, a.shape, sizes)
        if not allow_nonfinite and a.dtype.kind == "f" and not np.isfinite(a).all():
            raise BadRequest(f'input "{spec.name}" contains NaN or infinity; send finite values')
        if spec.value_range is not None and a.size:
            lo, hi = spec.value_range
            got_lo, got_hi = a.min(), a.max()
            if got_lo < lo or got_hi > hi:
                raise BadRequest(f'input "{spec.name}" holds values {got_lo}..{got_hi}, the model takes {lo}..{hi} '
                                 f"(recorded at build); map unknown ids into that range")
        arrays.append(a)
    if offset != len(tail):
        raise BadRequest(f"{len(tail) - offset} bytes of binary data are not claimed by any input's binary_data_size")
    params = doc.get("parameters") or {}
    if not isinstance(params, dict):
        raise BadRequest("'parameters' must be an object")
    wanted = doc.get("outputs")
    out_names = [s.name for s in outputs]
    binary: set[str] = set(out_names) if params.get("binary_data_output") else set()
    if wanted is None:
        selected = out_names
    else:
        if not isinstance(wanted, list):
            raise BadRequest("'outputs' must be a list of {name, parameters}")
        selected = []
        for o in wanted:
            if not isinstance(o, dict) or o.get("name") not in out_names:
                raise BadRequest(f"unknown output {o.get('name') if isinstance(o, dict) else o!r}; the model has {out_names}")
            selected.append(o["name"])
            p = o.get("parameters") or {}
            if not isinstance(p, dict):
                raise BadRequest(f'output "{o["name"]}": "parameters" must be an object, e.g. {{"binary_data": true}}')
            if p.get("binary_data") is True:
                binary.add(o["name"])
            elif p.get("binary_data") is False:
                binary.discard(o["name"])
    rows = int(arrays[0].shape[0]) if batched else 1
    rid = doc.get("id")
    return Decoded(str(rid) if rid is not None else None, arrays, rows, selected, binary, params)


def accepts(want: str, sent: object) -> bool:
    """The dtype rule that the Python API (kiln.runner) follows too: a float input takes any float datatype, an
    integer input any integer datatype; the values are converted to the model's type (and checked to fit)."""
    return sent == want or (want in _FLOATS and sent in _FLOATS) or (want in _INTS and sent in _INTS)


def _convert(a: np.ndarray, spec: TensorSpec, want: str, sent: str) -> np.ndarray:
    """`sent` data as the model's `want` type; integers that do not fit are refused, not wrapped around."""
    target = np.dtype(NUMPY[want])
    bad = out_of_range(target.name, a)
    if bad is not None:
        raise BadRequest(f'input "{spec.name}" is {want}; {sent} values {bad[0]}..{bad[1]} do not fit in it')
    with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf, which the finite check refuses
        return a.astype(target)


def _decode_tensor(t: dict[str, Any], spec: TensorSpec, tail: memoryview, offset: int) -> tuple[np.ndarray, int]:
    a, offset, sent = _decode_as_sent(t, spec, tail, offset)
    want = DATATYPES[spec.dtype]
    return (a if sent == want or want == "BF16" else _convert(a, spec, want, sent)), offset


def _decode_as_sent(t: dict[str, Any], spec: TensorSpec, tail: memoryview, offset: int) -> tuple[np.ndarray, int, str]:
    model = DATATYPES[spec.dtype]
    dt = t.get("datatype")
    if not accepts(model, dt):
        kinds = "any of FP16/FP32/FP64" if model in _FLOATS else "any integer datatype" if model in _INTS else model
        raise BadRequest(f'input "{spec.name}" is {model}: it takes {kinds}, got {dt!r}; convert the data to {model}')
    want = str(dt)
    shape = t.get("shape")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise BadRequest(f'input "{spec.name}" needs "shape": a list of non-negative integers, got {shape!r}')
    count = math.prod(shape)  # Python ints: a product of huge dims cannot wrap around as int64 would
    params = t.get("parameters") or {}
    size = params.get("binary_data_size") if isinstance(params, dict) else None
    np_dtype = np.dtype("<u2") if want == "BF16" else np.dtype(NUMPY[want]).newbyteorder("<")
    if size is not None:
        if not isinstance(size, int) or size < 0:
            raise BadRequest(f'input "{spec.name}": binary_data_size must be a non-negative integer')
        if size != count * np_dtype.itemsize:
            raise BadRequest(f'input "{spec.name}": shape {shape} of {want} needs {count * np_dtype.itemsize} bytes, '
                             f"binary_data_size says {size}")
        if offset + size > len(tail):
            raise BadRequest(f'input "{spec.name}": binary data ends after {len(tail) - offset} of {size} bytes')
        a = np.frombuffer(tail[offset:offset + size], dtype=np_dtype).reshape(shape)
        if want == "BF16":
            a = (a.astype(np.uint32) << 16).view(np.float32)  # bfloat16 bits -> float32, exact
        return a, offset + size, want
    if want in ("BF16",):
        raise BadRequest(f'input "{spec.name}" is BF16, which JSON cannot carry; send it as binary data')
    data = t.get("data")
    if data is None:
        raise BadRequest(f'input "{spec.name}" has neither "data" nor a binary_data_size parameter')
    try:
        a = np.asarray(data, dtype=NUMPY[want])
    except (ValueError, TypeError, OverflowError):
        raise BadRequest(f'input "{spec.name}": "data" must be a flat or nested list of {want} numbers') from None
    if a.size != count:
        raise BadRequest(f'input "{spec.name}": shape {shape} has {count} elements but "data" has {a.size}')
    return a.reshape(shape), offset, want


def _check_shape(spec: TensorSpec, shape: tuple[int, ...], sizes: dict[str, int]) -> None:
    expect = f"{DATATYPES[spec.dtype]}[{','.join(str(d) for d in spec.shape)}]"
    if not spec.matches(shape):
        hint = layout_hint(spec, shape) or ("add a batch dimension" if len(shape) == len(spec.shape) - 1 else "fix the shape")
        raise BadRequest(f'expected input "{spec.name}" {expect}, got shape {list(shape)}: {hint}')
    limits = spec.limits
    for i, d in spec.dynamic_dims.items():
        if shape[i] == 0:
            raise BadRequest(f'input "{spec.name}" has an empty {d!r} dimension; send at least one item')
        if d in limits and shape[i] > limits[d]:
            raise BadRequest(f'input "{spec.name}": {d!r} is {shape[i]}, the model supports at most {limits[d]}; '
                             "truncate or split the input")
        if sizes.setdefault(d, shape[i]) != shape[i]:
            raise BadRequest(f'dim {d!r} is {sizes[d]} in an earlier input but {shape[i]} in "{spec.name}"; inputs sharing a dim must agree')


def encode_response(model: str, version: str, rid: str | None, names: list[str], arrays: list[np.ndarray],
                    outputs: list[TensorSpec], binary: set[str]) -> tuple[bytes, int | None]:
    """JSON body (plus binary tail when asked); returns (body, header length or None)."""
    specs = {s.name: s for s in outputs}
    outs: list[dict[str, Any]] = []
    tails: list[bytes] = []
    for name, a in zip(names, arrays):
        dt = DATATYPES[specs[name].dtype] if specs[name].dtype != "bfloat16" else "FP32"
        o: dict[str, Any] = {"name": name, "datatype": dt, "shape": list(a.shape)}
        if name in binary:
            raw = np.ascontiguousarray(a, dtype=np.dtype(NUMPY[dt]).newbyteorder("<")).tobytes()
            o["parameters"] = {"binary_data_size": len(raw)}
            tails.append(raw)
        else:
            o["data"] = a.ravel()
        outs.append(o)
    head: dict[str, Any] = {"model_name": model, "model_version": version, "outputs": outs}
    if rid is not None:
        head["id"] = rid
    body = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tails:
        return body, None
    return body + b"".join(tails), len(body)
