"""Verification inputs: the user's .npz (arrays keyed by input name, optional `labels`) or synthetic ones."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kiln.errors import KilnError
from kiln.runner import check_tensor
from kiln.spec import TensorSpec, example_sizes, synthetic, to_tensor

LABELS = "labels"
MAX_ITEMS = 2048
# Batch sizes for verification: batch 1 first, then odd sizes, so dynamic batching is exercised too.
_SYNTHETIC_BATCHES = (1, 16, 33, 64, 7, 50, 64, 64)


@dataclass
class VerifyData:
    batches: list[list[torch.Tensor]]
    labels: np.ndarray | None
    description: str
    items: int
    from_user: bool = False
    calibration: list[list[torch.Tensor]] | None = None


def batch_dim(inputs: list[TensorSpec]) -> str | None:
    """The batch dim: the first dim of the first input, when it is dynamic."""
    if inputs and inputs[0].shape and isinstance(inputs[0].shape[0], str):
        return inputs[0].shape[0]
    return None


def read_npz(path: Path, inputs: list[TensorSpec]) -> tuple[list[np.ndarray], np.ndarray | None]:
    if not path.is_file():
        raise KilnError(f"data file not found: {path}", hint="give an .npz with one array per input name")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # a damaged archive raises anything (BadZipFile, zlib.error, EOFError, ValueError)
        raise KilnError(f"cannot read {path} as .npz: {type(e).__name__}: {e}",
                        hint="save it with numpy.savez(path, image=..., labels=...)") from None
    missing = [s.name for s in inputs if s.name not in arrays]
    if missing:
        raise KilnError(f"{path} lacks arrays {missing} (it has {sorted(arrays)})",
                        hint="key each array by its input name, e.g. numpy.savez(path, image=x, labels=y)")
    sizes: dict[str, int] = {}
    xs = [check_tensor(s, arrays[s.name], sizes).numpy() if s.dtype != "bfloat16" else arrays[s.name] for s in inputs]
    n = {len(x) for x in xs}
    if len(n) != 1:
        raise KilnError(f"arrays in {path} have different lengths {sorted(n)}", hint="one row per item in every array")
    labels = arrays.get(LABELS)
    if labels is not None and len(labels) != len(xs[0]):
        raise KilnError(f"{path}: labels has {len(labels)} rows but inputs have {len(xs[0])}", hint="one label per item")
    return xs, labels


def verification_data(inputs: list[TensorSpec], data: Path | None, *, seed: int = 1234, calib: Path | None = None,
                      hold_out: bool = False) -> VerifyData:
    """Verification batches, plus calibration batches disjoint from them: `calib`, else (with `hold_out`)
    the first quarter of `data` (at most 256 items), else synthetic inputs of another seed."""
    b = batch_dim(inputs)
    calibration: list[list[torch.Tensor]] | None = None
    if calib is not None:
        cx, _ = read_npz(calib, inputs)
        calibration = _chunks(inputs, cx, 0, min(len(cx[0]), 512), 64)
    if data is not None:
        xs, labels = read_npz(data, inputs)
        if b is None:
            raise KilnError("--data needs a model with a dynamic batch dim", hint="name the first dim, e.g. image:float32[batch,1,8,8]")
        start = 0
        if hold_out and calibration is None and len(xs[0]) >= 8:
            start = min(256, len(xs[0]) // 4)
            calibration = _chunks(inputs, xs, 0, start, 64)
        n = min(len(xs[0]), start + MAX_ITEMS)
        bounds = sorted({start, start + 1, *range(start + 64, n, 64), n})
        batches = [[to_tensor(x[lo:hi], s) for s, x in zip(inputs, xs)] for lo, hi in zip(bounds, bounds[1:])]
        held = f"; {start} others held out for calibration" if start else ""
        return VerifyData(batches, labels[start:n] if labels is not None else None, f"{data.name} ({n - start} items{held})",
                          n - start, from_user=True, calibration=calibration)
    rng = np.random.default_rng(seed)
    batches = []
    rounds = _SYNTHETIC_BATCHES if b else (1, 1, 1, 1)
    for i, size in enumerate(rounds):
        sizes = example_sizes(inputs, scale=i)
        if b:
            sizes[b] = size
        batches.append([to_tensor(synthetic(s, sizes, rng), s) for s in inputs])
    items = sum(len(x[0]) for x in batches) if b else len(batches)
    if calibration is None:
        crng = np.random.default_rng(seed + 1)
        csizes = example_sizes(inputs)
        if b:
            csizes[b] = 16
        calibration = [[to_tensor(synthetic(s, csizes, crng), s) for s in inputs] for _ in range(4)]
    return VerifyData(batches, None, f"synthetic inputs ({items} items)", items, calibration=calibration)


def _chunks(inputs: list[TensorSpec], xs: list[np.ndarray], lo: int, hi: int, size: int) -> list[list[torch.Tensor]]:
    return [[to_tensor(x[a:min(hi, a + size)], s) for s, x in zip(inputs, xs)] for a in range(lo, hi, size)]


def timing_inputs(inputs: list[TensorSpec], batch: int, verify: VerifyData, dim_sizes: dict[str, int]) -> list[torch.Tensor]:
    """Inputs of `batch` rows for timing: the user's data (tiled) when it fits (its other dynamic dims, e.g. a
    padded sequence, have the sizes `dim_sizes` asks for), else synthetic."""
    b = batch_dim(inputs)
    fits = all(verify.batches[0][k].shape[axis] == dim_sizes.get(name, verify.batches[0][k].shape[axis])
               for k, s in enumerate(inputs) for axis, name in s.dynamic_dims.items() if axis != 0) if verify.batches else False
    if b and verify.from_user and fits:
        cat = [torch.cat([x[k] for x in verify.batches]) for k in range(len(inputs))]
        reps = -(-batch // len(cat[0]))
        return [c.repeat(reps, *([1] * (c.dim() - 1)))[:batch].contiguous() for c in cat]
    sizes = {**example_sizes(inputs), **dim_sizes}
    if b:
        sizes[b] = batch
    rng = np.random.default_rng(7)
    return [to_tensor(synthetic(s, sizes, rng), s) for s in inputs]
