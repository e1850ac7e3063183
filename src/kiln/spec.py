"""TensorSpec: the name, dtype and shape (with named dynamic dims) of one model input or output."""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.errors import KilnError

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "int64": torch.int64,
    "int32": torch.int32,
    "int16": torch.int16,
    "int8": torch.int8,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
_TORCH_TO_NAME = {v: k for k, v in DTYPES.items()}
_SPEC_RE = re.compile(
    r"^(?P<name>[A-Za-z_][\w.\-]*):(?P<dtype>\w+)\[(?P<dims>[^\]]*)\](?:@(?P<lo>-?\d+)\.\.(?P<hi>-?\d+))?$"
)

Dim = int | str
OUTPUT_KINDS = ("logits", "embedding", "regression", "mask", "boxes")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor of a model's signature. String dims are dynamic and named (`batch`, `seq`).

    >>> TensorSpec.parse("image:float32[batch,1,8,8]").shape
    ('batch', 1, 8, 8)
    """

    name: str
    dtype: str
    shape: tuple[Dim, ...]
    # Inclusive value range of integer inputs (token ids, masks): synthetic data follows it, the server enforces it.
    value_range: tuple[int, int] | None = field(default=None, compare=False)
    # The largest size a dynamic dim may take (`seq<=512`: a model's position table), enforced by the server.
    dim_max: tuple[tuple[str, int], ...] = field(default=(), compare=False)
    # What an output is (logits, embedding, regression, mask, boxes): how verification and drift watch judge it.
    kind: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise KilnError(
                f"unknown dtype {self.dtype!r} for tensor {self.name!r}",
                hint=f"use one of {', '.join(DTYPES)}",
            )
        if self.kind is not None and self.kind not in OUTPUT_KINDS:
            raise KilnError(f"unknown output kind {self.kind!r} for {self.name!r}", hint=f"use one of {', '.join(OUTPUT_KINDS)}")

    @classmethod
    def parse(cls, text: str) -> TensorSpec:
        """Parse `NAME:DTYPE[DIM,...]`, optionally followed by `@LOW..HIGH` for integer inputs."""
        m = _SPEC_RE.match(text.strip())
        if not m:
            raise KilnError(
                f"cannot parse input spec {text!r}",
                hint="write NAME:DTYPE[DIMS], e.g. image:float32[batch,1,8,8] or ids:int64[batch,seq]@0..999",
            )
        raw = [d.strip() for d in m["dims"].split(",") if d.strip()]
        limits = []
        for k, d in enumerate(raw):
            name, sep, most = d.partition("<=")
            if sep:
                if not most.strip().isdigit() or int(most) < 1:
                    raise KilnError(f"bad dim limit {d!r} in {text!r}", hint="write NAME<=N, e.g. seq<=512")
                limits.append((name.strip(), int(most)))
                raw[k] = name
        dims = tuple(_parse_dim(d, text) for d in raw)
        rng = (int(m["lo"]), int(m["hi"])) if m["lo"] is not None else None
        return cls(m["name"], m["dtype"], dims, rng, tuple(limits))

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def dynamic_dims(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}

    @property
    def limits(self) -> dict[str, int]:
        return dict(self.dim_max)

    def __str__(self) -> str:
        most = self.limits
        dims = ",".join(f"{d}<={most[d]}" if isinstance(d, str) and d in most else str(d) for d in self.shape)
        rng = f"@{self.value_range[0]}..{self.value_range[1]}" if self.value_range else ""
        return f"{self.name}:{self.dtype}[{dims}]{rng}"

    def concrete_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        return tuple(sizes[d] if isinstance(d, str) else d for d in self.shape)

    def matches(self, shape: tuple[int, ...]) -> bool:
        return len(shape) == len(self.shape) and all(
            isinstance(d, str) or d == s for d, s in zip(self.shape, shape)
        )

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.value_range is not None:
            d["range"] = list(self.value_range)
        if self.dim_max:
            d["max"] = dict(self.dim_max)
        if self.kind:
            d["kind"] = self.kind
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        try:
            rng = d.get("range")
            most = dict(d.get("max") or {})
            shape: list[Dim] = []
            for dim in d["shape"]:  # "seq<=512" in a kiln.toml shape names the dim and its largest size
                if isinstance(dim, str) and "<=" in dim:
                    name, _, cap = dim.partition("<=")
                    if not cap.strip().isdigit():
                        raise KilnError(f"bad dim limit {dim!r} in {d!r}", hint="write NAME<=N, e.g. seq<=512")
                    most[name.strip()] = int(cap)
                    dim = name.strip()
                shape.append(dim)
            return cls(str(d["name"]), str(d["dtype"]), tuple(shape), (int(rng[0]), int(rng[1])) if rng else None,
                       tuple((str(k), int(v)) for k, v in most.items()), d.get("kind"))
        except (KeyError, TypeError) as e:
            raise KilnError(
                f"invalid tensor spec {d!r}: {e}",
                hint='write name = "image", dtype = "float32", shape = ["batch", 1, 8, 8]',
            ) from None


def _parse_dim(d: str, text: str) -> Dim:
    d = d.strip()
    if d.lstrip("-").isdigit():
        n = int(d)
        if n < 0:
            raise KilnError(f"negative dimension in {text!r}", hint="name dynamic dims instead, e.g. batch")
        return n
    if not re.match(r"^[A-Za-z_]\w*$", d):
        raise KilnError(f"bad dimension {d!r} in {text!r}", hint="dims are integers or names like batch, seq")
    return d


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _TORCH_TO_NAME[dtype]
    except KeyError:
        raise KilnError(f"unsupported tensor dtype {dtype}", hint=f"kiln handles {', '.join(DTYPES)}") from None


def load_toml_specs(path: Path) -> tuple[str | None, list[TensorSpec]]:
    """Read `kiln.toml` (name and `[[inputs]]` tables) that sits beside a model."""
    try:
        doc = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise KilnError(f"cannot read {path}: {e}", hint="fix the TOML syntax") from None
    _check_keys(doc, _TOML_KEYS, f"{path}")
    for i, table in enumerate(doc.get("inputs", [])):
        if isinstance(table, dict):
            _check_keys(table, _INPUT_KEYS, f"{path} [[inputs]] #{i + 1}")
    inputs = [TensorSpec.from_dict(t) for t in doc.get("inputs", [])]
    name = doc.get("name")
    return (str(name) if name else None), inputs


_TOML_KEYS = ("name", "inputs", "outputs", "preprocess", "columns")
_INPUT_KEYS = ("name", "dtype", "shape", "range", "max")
_OUTPUT_KEYS = ("name", "kind")


def load_toml_outputs(path: Path) -> dict[str, str]:
    """The output kinds a kiln.toml declares: `[[outputs]]` tables with name and kind."""
    doc = tomllib.loads(path.read_text())
    kinds = {}
    for i, table in enumerate(doc.get("outputs", [])):
        where = f"{path} [[outputs]] #{i + 1}"
        if not isinstance(table, dict) or "name" not in table or "kind" not in table:
            raise KilnError(f"{where}: needs name and kind", hint='write name = "embedding", kind = "embedding"')
        _check_keys(table, _OUTPUT_KEYS, where)
        kinds[str(table["name"])] = parse_output_kind(f"{table['name']}:{table['kind']}")[1]
    return kinds


def load_toml_columns(path: Path, inputs: list[TensorSpec]) -> dict[str, list[str]]:
    """`[columns]`: the table columns that feed each input, by name, in the order the model was trained with
    (`x = ["age", "income", "tenure"]`); `kiln predict` reads tables by these names."""
    cols = tomllib.loads(path.read_text()).get("columns", {})
    names = [s.name for s in inputs]
    out = {}
    for k, v in cols.items():
        if not isinstance(v, list) or not all(isinstance(c, str) for c in v):
            raise KilnError(f"{path} [columns] {k}: must be a list of column names", hint='write x = ["age", "income"]')
        if names and k not in names:
            raise KilnError(f"{path} [columns] names {k!r}, but the model's inputs are {names}", hint="use an input's name")
        out[str(k)] = list(v)
    return out


def parse_output_kind(text: str) -> tuple[str, str]:
    """`NAME:KIND` (--output) -> (name, kind)."""
    name, sep, kind = text.strip().rpartition(":")
    if not sep or not name or kind not in OUTPUT_KINDS:
        raise KilnError(f"cannot parse output kind {text!r}",
                        hint=f"write NAME:KIND with KIND one of {', '.join(OUTPUT_KINDS)}, e.g. embedding:embedding")
    return name, kind


def _check_keys(table: dict[str, Any], known: tuple[str, ...], where: str) -> None:
    """A typo in kiln.toml is an error that names the key and the nearest known one, not a silent default."""
    import difflib

    for key in table:
        if key not in known:
            near = difflib.get_close_matches(key, known, n=1)
            raise KilnError(f"{where}: unknown key {key!r}" + (f" (did you mean {near[0]!r}?)" if near else ""),
                            hint=f"the keys are {', '.join(known)}")
    missing = [k for k in ("name", "dtype", "shape") if known is _INPUT_KEYS and k not in table]
    if missing:
        raise KilnError(f"{where}: missing {', '.join(missing)}",
                        hint='each [[inputs]] needs name = "image", dtype = "float32", shape = ["batch", 1, 8, 8]')


def out_of_range(dtype: str, a: Any) -> tuple[int, int] | None:
    """(lowest, highest) of integer values `a` (numpy or torch) when they do not fit integer type `dtype`; None when
    they do (or `dtype` is not an integer type). Converting them would wrap around; the API and the server refuse."""
    if not dtype.startswith(("int", "uint")) or not (a.numel() if isinstance(a, torch.Tensor) else a.size):
        return None
    info = np.iinfo(dtype)
    lo, hi = int(a.min()), int(a.max())
    return (lo, hi) if lo < info.min or hi > info.max else None


def layout_hint(spec: TensorSpec, shape: tuple[int, ...]) -> str | None:
    """For a 4-D array whose channels sit last where the model wants them first (NHWC vs NCHW): the fix."""
    want = spec.shape
    if len(shape) == 4 and len(want) == 4 and isinstance(want[1], int) and shape[3] == want[1] \
            and all(isinstance(w, str) or w == s for w, s in zip(want[2:], shape[1:3])):
        return "the array looks channels-last (NHWC); the model takes NCHW: numpy.transpose(x, (0, 3, 1, 2))"
    return None


# Sizes used for dynamic dims when kiln makes example inputs: distinct, >= 2 (so torch.export
# keeps them dynamic instead of specialising on 0/1), and not equal to any typical static dim.
EXAMPLE_SIZES = (3, 7, 5, 11, 13)


def example_sizes(specs: list[TensorSpec], *, scale: int = 0) -> dict[str, int]:
    """One size per distinct dynamic dim name; `scale` picks another set for variety."""
    names: list[str] = []
    for s in specs:
        for d in s.dynamic_dims.values():
            if d not in names:
                names.append(d)
    return {n: EXAMPLE_SIZES[(i + scale) % len(EXAMPLE_SIZES)] for i, n in enumerate(names)}


def is_mask_input(spec: TensorSpec) -> bool:
    """An input named like an attention/padding mask, with a batch and a sequence dim."""
    return "mask" in spec.name.lower() and len(spec.shape) >= 2


def synthetic(spec: TensorSpec, sizes: dict[str, int], rng: np.random.Generator) -> np.ndarray:
    """A random array for `spec`: standard normal for floats, uniform in the value range for ints; a mask
    (`attention_mask`) gets what a tokenizer makes, a valid prefix of ones per row, and token type ids zeros."""
    shape = spec.concrete_shape(sizes)
    if is_mask_input(spec):
        lengths = rng.integers(1, shape[1] + 1, size=shape[0])
        lengths[0] = shape[1]  # one full row: every position is used at least once
        keep = np.arange(shape[1])[None, :] < lengths[:, None]
        return np.broadcast_to(keep.reshape(keep.shape + (1,) * (len(shape) - 2)), shape).astype(
            np.float32 if spec.dtype == "bfloat16" else spec.dtype)
    if "token_type" in spec.name.lower() and not spec.torch_dtype.is_floating_point:
        return np.zeros(shape, spec.dtype)
    if spec.dtype == "bool":
        return rng.random(shape) < 0.5
    if spec.torch_dtype.is_floating_point:
        a = rng.standard_normal(shape).astype(np.float32)
        return a if spec.dtype in ("float32", "bfloat16") else a.astype(spec.dtype)
    lo, hi = spec.value_range or (0, 1)
    return rng.integers(lo, hi + 1, size=shape).astype(spec.dtype)


def to_tensor(a: Any, spec: TensorSpec) -> torch.Tensor:
    """numpy/tensor -> tensor of the spec's dtype (bfloat16 has no numpy dtype: arrive as float32)."""
    t = a if isinstance(a, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(a))
    return t.to(spec.torch_dtype) if t.dtype != spec.torch_dtype else t
