"""Where offline inputs come from: .npy/.npz arrays, folders of images, .parquet/.csv tables.

Each source is a list of items with stable ids (`file.npz:17`, `images/cat.png`), fetched a batch at a
time by row indices, so that DataLoader workers and Ray actors can share the same reader.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.errors import KilnError
from kiln.spec import TensorSpec, layout_hint

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class Preprocess:
    """Image preprocessing, from the `[preprocess]` table of the model's kiln.toml (recorded at build)."""

    mode: str = "RGB"  # Pillow mode: L (grey) or RGB
    resize: list[int] | None = None  # [height, width]
    crop: list[int] | None = None  # centre crop [height, width], after resize
    scale: float = 1.0 / 255.0  # applied to pixel values first
    mean: list[float] | None = None
    std: list[float] | None = None
    layout: str = "CHW"  # CHW or HWC, without the batch dim

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Preprocess:
        d = dict(d or {})
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise KilnError(f"unknown preprocess settings {sorted(unknown)}", hint=f"use {sorted(cls.__dataclass_fields__)}")
        return cls(**d)

    def apply(self, path: Path) -> np.ndarray:
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                im = opened.convert(self.mode)
                if self.resize:
                    im = im.resize((self.resize[1], self.resize[0]), Image.Resampling.BILINEAR)
                if self.crop:
                    h, w = self.crop
                    left, top = (im.width - w) // 2, (im.height - h) // 2
                    im = im.crop((left, top, left + w, top + h))
                a = np.asarray(im, dtype=np.float32)
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise ValueError(f"unreadable image: {e}") from None
        a = a * np.float32(self.scale)
        if a.ndim == 2:
            a = a[:, :, None]
        if self.mean is not None:
            a = np.subtract(a, np.asarray(self.mean, np.float32), dtype=np.float32)
        if self.std is not None:
            a = np.divide(a, np.asarray(self.std, np.float32), dtype=np.float32)
        return np.ascontiguousarray(a.transpose(2, 0, 1) if self.layout == "CHW" else a)


@dataclass
class Inputs:
    """Every item of every input path, in a fixed order. `fetch(indices)` reads a batch."""

    specs: list[TensorSpec]
    ids: list[str]
    kind: str  # arrays | images | table
    paths: list[Path]
    where: list[tuple[int, int]]  # item -> (path index, row) for arrays and tables
    preprocess: Preprocess = field(default_factory=Preprocess)
    _cache: dict[int, list[np.ndarray]] = field(default_factory=dict, repr=False)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()

    def fetch(self, indices: list[int]) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
        """-> (indices that loaded, one array per input for them, [(index, error)] for the rest)."""
        if self.kind == "images":
            ok: list[int] = []
            images: list[np.ndarray] = []
            bad: list[tuple[int, str]] = []
            for i in indices:
                try:
                    a = self.preprocess.apply(self.paths[i])
                    spec = self.specs[0]
                    if not spec.matches((1, *a.shape)):
                        raise ValueError(f"preprocessed to shape {list(a.shape)}, the model wants {list(spec.shape[1:])}; "
                                         "fix [preprocess] resize/crop/mode/layout in kiln.toml")
                    ok.append(i)
                    images.append(a)
                except ValueError as e:
                    bad.append((i, str(e)))
            arrays = [np.stack(images).astype(self.specs[0].dtype, copy=False)] if images else []
            return ok, arrays, bad
        by_file: dict[int, list[tuple[int, int]]] = {}
        for i in indices:
            f, row = self.where[i]
            by_file.setdefault(f, []).append((i, row))
        parts: list[list[np.ndarray]] = []
        for f, items in by_file.items():
            arrays = self._load(f)
            rows = np.asarray([r for _, r in items])
            parts.append([a[rows] for a in arrays])
        merged = [np.concatenate([p[k] for p in parts]) for k in range(len(self.specs))]
        order = [i for items in by_file.values() for i, _ in items]
        return order, merged, []

    def _load(self, f: int) -> list[np.ndarray]:
        if f not in self._cache:
            self._cache[f] = read_arrays(self.paths[f], self.specs, self.kind)
        return self._cache[f]


def read_arrays(path: Path, specs: list[TensorSpec], kind: str) -> list[np.ndarray]:
    """All rows of one array or table file, one array per input, checked against the specs."""
    try:
        if kind == "table":
            arrays = [_read_table(path, specs)]
        elif path.suffix == ".npy":
            if len(specs) != 1:
                raise KilnError(f"{path}: a .npy holds one array but the model takes {[s.name for s in specs]}",
                                hint="use an .npz keyed by input name")
            arrays = [np.load(path, mmap_mode="r", allow_pickle=False)]
        else:
            with np.load(path, allow_pickle=False) as z:
                missing = [s.name for s in specs if s.name not in z.files]
                if missing:
                    raise KilnError(f"{path} lacks arrays {missing} (it has {sorted(z.files)})",
                                    hint="key each array by its input name: numpy.savez(path, image=...)")
                arrays = [z[s.name] for s in specs]
    except KilnError:
        raise
    except Exception as e:  # a damaged file raises anything (BadZipFile, zlib.error, EOFError, ArrowInvalid): unreadable
        raise KilnError(f"cannot read {path}: {type(e).__name__}: {e}",
                        hint="check that the file is a valid .npy/.npz/.parquet/.csv") from None
    for spec, a in zip(specs, arrays):
        if not spec.matches(a.shape):
            raise KilnError(f"{path}: array {spec.name!r} has shape {list(a.shape)}, the model takes "
                            f"{spec.dtype}[{','.join(map(str, spec.shape))}]",
                            hint=layout_hint(spec, a.shape) or "one row per item along the first axis")
    n = {len(a) for a in arrays}
    if len(n) != 1:
        raise KilnError(f"{path}: arrays have different lengths {sorted(n)}", hint="one row per item in every array")
    return arrays


def _read_table(path: Path, specs: list[TensorSpec]) -> np.ndarray:
    import pyarrow.compute  # noqa: F401  (registers compute kernels used by to_numpy)
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq
    import pyarrow.types as pt

    if len(specs) != 1 or len(specs[0].shape) != 2:
        raise KilnError("tables feed models with one 2-D input [batch, features]",
                        hint="save other inputs as .npz keyed by input name")
    table = pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)
    cols = [n for n, t in zip(table.column_names, table.schema.types) if pt.is_integer(t) or pt.is_floating(t)]
    want = specs[0].shape[1]
    if isinstance(want, int) and len(cols) != want:
        raise KilnError(f"{path}: {len(cols)} numeric columns ({', '.join(cols[:12])}), the model takes {want} features",
                        hint="keep exactly the feature columns, in the model's order")
    return np.stack([table.column(c).to_numpy().astype(specs[0].dtype) for c in cols], axis=1)


def collect(paths: list[str | Path], specs: list[TensorSpec], preprocess: Preprocess) -> tuple[Inputs, list[tuple[str, str]]]:
    """Expand folders and files into items. Returns the inputs and [(path, error)] for unreadable files."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise KilnError(f"input not found: {p}", hint="give .npy/.npz/.parquet/.csv files or folders of images")
    if not files:
        raise KilnError("no input files", hint="give .npy/.npz/.parquet/.csv files or folders of images")
    images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES]
    tables = [f for f in files if f.suffix in (".parquet", ".csv")]
    arrays = [f for f in files if f.suffix in (".npy", ".npz")]
    kinds = [k for k, v in (("images", images), ("table", tables), ("arrays", arrays)) if v]
    if len(kinds) > 1:
        raise KilnError(f"inputs mix {' and '.join(kinds)}", hint="run kiln predict once per kind of input")
    bad: list[tuple[str, str]] = []
    other = sorted(set(files) - set(images) - set(tables) - set(arrays))
    bad += [(str(f), f"not an input file (suffix {f.suffix or 'none'})") for f in other]
    if kinds == ["images"]:
        if len(specs) != 1:
            raise KilnError("images feed models with one input", hint="save several inputs as .npz")
        return Inputs(specs, [str(f) for f in images], "images", images, [], preprocess), bad
    kind = kinds[0] if kinds else "arrays"
    chosen = tables if kind == "table" else arrays
    ids: list[str] = []
    where: list[Any] = []
    keep: list[Path] = []
    for f in chosen:
        try:
            n = len(read_arrays(f, specs, kind)[0])
        except KilnError as e:
            bad.append((str(f), e.message))
            continue
        k = len(keep)
        keep.append(f)
        ids += [f"{f}:{r}" for r in range(n)]
        where += [(k, r) for r in range(n)]
    return Inputs(specs, ids, kind, keep, where, preprocess), bad
