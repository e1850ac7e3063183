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

    def apply(self, path: Path, fit: tuple[int, int] | None = None) -> np.ndarray:
        """One image file -> float32 array. `fit` (height, width) resizes an image of another size when no resize or
        crop is configured (the model's own spatial size)."""
        from PIL import Image, UnidentifiedImageError

        try:
            with Image.open(path) as opened:
                im = opened.convert(self.mode)
                size = self.resize or (list(fit) if fit and (im.height, im.width) != fit else None)
                if size:
                    im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
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


    def fit_size(self, spec: TensorSpec) -> tuple[int, int] | None:
        """The model's fixed (height, width) when nothing in [preprocess] sets the size, else None."""
        if self.resize or self.crop or len(spec.shape) != 4:
            return None
        hw = spec.shape[2:4] if self.layout == "CHW" else spec.shape[1:3]
        return (hw[0], hw[1]) if all(isinstance(d, int) for d in hw) else None  # type: ignore[return-value]


@dataclass
class TableLayout:
    """Which table columns feed which input, by name, fixed from the first table (or declared), so that every file
    is read the same way whatever its column order; and the column whose values become the items' ids."""

    columns: dict[str, list[str]]
    id_column: str | None = None


@dataclass
class Loaded:
    """One array or table file: an array per input, rows that cannot run (NaN, missing values), ids if a table
    carries them."""

    arrays: list[np.ndarray]
    bad_rows: dict[int, str]
    ids: list[str] | None = None


@dataclass
class Inputs:
    """Every item of every input path, in a fixed order. `fetch(indices)` reads a batch."""

    specs: list[TensorSpec]
    ids: list[str]
    kind: str  # arrays | images | table
    paths: list[Path]
    where: list[tuple[int, int]]  # item -> (path index, row) for arrays and tables
    preprocess: Preprocess = field(default_factory=Preprocess)
    layout: TableLayout | None = None
    fit: tuple[int, int] | None = None
    notes: list[str] = field(default_factory=list)
    _cache: dict[int, Loaded] = field(default_factory=dict, repr=False)

    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.ids).encode()).hexdigest()

    def fetch(self, indices: list[int]) -> tuple[list[int], list[np.ndarray], list[tuple[int, str]]]:
        """-> (indices that loaded, one array per input for them, [(index, error)] for the rest)."""
        bad: list[tuple[int, str]] = []
        if self.kind == "images":
            ok: list[int] = []
            images: list[np.ndarray] = []
            for i in indices:
                try:
                    a = self.preprocess.apply(self.paths[i], self.fit)
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
            reason = self._load(f).bad_rows.get(row)
            if reason is not None:
                bad.append((i, reason))
            else:
                by_file.setdefault(f, []).append((i, row))
        if not by_file:
            return [], [], bad
        parts: list[list[np.ndarray]] = []
        for f, items in by_file.items():
            arrays = self._load(f).arrays
            rows = np.asarray([r for _, r in items])
            parts.append([a[rows] for a in arrays])
        merged = [np.concatenate([p[k] for p in parts]) for k in range(len(self.specs))]
        order = [i for items in by_file.values() for i, _ in items]
        return order, merged, bad

    def _load(self, f: int) -> Loaded:
        if f not in self._cache:
            self._cache[f] = read_arrays(self.paths[f], self.specs, self.kind, self.layout)
        return self._cache[f]


def read_arrays(path: Path, specs: list[TensorSpec], kind: str, layout: TableLayout | None = None) -> Loaded:
    """All rows of one array or table file, one array per input, checked against the specs; rows with NaN,
    infinity or a missing value are named in `bad_rows` (they would give NaN outputs)."""
    ids = None
    try:
        if kind == "table":
            assert layout is not None
            arrays, ids = _read_table(path, specs, layout)
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
    bad: dict[int, str] = {}
    for spec, a in zip(specs, arrays):
        if a.dtype.kind != "f" or not len(a):
            continue
        finite = np.isfinite(a.reshape(len(a), -1)).all(axis=1)
        for row in np.flatnonzero(~finite)[:100_000]:
            bad.setdefault(int(row), _nan_reason(spec, a[row], layout))
    if kind == "table":
        with np.errstate(invalid="ignore"):  # a missing value in an integer column: its row is in `bad`, never run
            arrays = [a if s.dtype == "bfloat16" or a.dtype == np.dtype(s.dtype) else a.astype(s.dtype)
                      for s, a in zip(specs, arrays)]
    return Loaded(arrays, bad, ids)


def _nan_reason(spec: TensorSpec, row: np.ndarray, layout: TableLayout | None) -> str:
    cols = layout.columns.get(spec.name) if layout else None
    if cols and len(cols) == row.size:
        named = [c for c, v in zip(cols, row.ravel()) if not np.isfinite(v)]
        return f"missing value, NaN or infinity in input {spec.name!r} (column {', '.join(named[:5])})"
    return f"NaN or infinity in input {spec.name!r}: it would give NaN outputs; fix or drop the row"


def _open_table(path: Path) -> Any:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    return pq.read_table(path) if path.suffix == ".parquet" else pcsv.read_csv(path)


def _is_list(t: Any) -> bool:
    import pyarrow.types as pt

    return bool(pt.is_fixed_size_list(t) or pt.is_list(t) or pt.is_large_list(t))


def _numeric(t: Any) -> bool:
    import pyarrow.types as pt

    if _is_list(t):
        return _numeric(t.value_type)
    return bool(pt.is_integer(t) or pt.is_floating(t) or pt.is_boolean(t))


def table_layout(path: Path, specs: list[TensorSpec], declared: dict[str, list[str]] | None,
                 id_column: str | None) -> tuple[TableLayout, list[str]]:
    """Decide from the first table which columns feed which input, by name: declared columns first, then a
    column named like an input, then (one 2-D input left) the remaining numeric columns in this file's order.
    A column named `id` (or `id_column`) is carried into the output as the items' ids."""
    try:
        schema = _open_table(path).schema
    except Exception as e:  # a damaged file raises anything
        raise KilnError(f"cannot read {path}: {type(e).__name__}: {e}", hint="check that the file is a valid .parquet/.csv") from None
    names = list(schema.names)
    if id_column is not None and id_column not in names:
        raise KilnError(f"{path} has no column {id_column!r} for the ids", hint=f"its columns are {names[:20]}")
    idc = id_column or next((n for n in names if n.lower() == "id"), None)
    known = {s.name for s in specs}
    unknown = sorted(set(declared or {}) - known)
    if unknown:
        raise KilnError(f"columns declared for {unknown}, but the model's inputs are {sorted(known)}",
                        hint="write INPUT=col1,col2,... with the model's input names")
    cols: dict[str, list[str]] = {}
    for spec in specs:
        if declared and spec.name in declared:
            cols[spec.name] = list(declared[spec.name])
        elif spec.name in names:
            cols[spec.name] = [spec.name]
    notes: list[str] = []
    rest = [s for s in specs if s.name not in cols]
    if len(rest) > 1:
        raise KilnError(f"{path}: no columns for inputs {[s.name for s in rest]}",
                        hint="name table columns after the model's inputs, or declare them: --columns INPUT=col1,col2,...")
    if rest:
        spec = rest[0]
        if len(spec.shape) != 2:
            raise KilnError(f"{path}: input {spec.name!r} is {spec.dtype}[{','.join(map(str, spec.shape))}], which a "
                            "table's columns cannot fill", hint="save it as .npz keyed by input name")
        used = {c for v in cols.values() for c in v}
        feats = [n for n, t in zip(names, schema.types) if n != idc and n not in used and _numeric(t)]
        want = spec.shape[1]
        if isinstance(want, int) and len(feats) != want:
            raise KilnError(f"{path}: {len(feats)} numeric columns ({', '.join(feats[:12])}), the model takes {want} features",
                            hint="keep exactly the feature columns, or declare them: --columns "
                                 f"{spec.name}=col1,col2,... (a column named 'id' is carried through as the item id)")
        cols[spec.name] = feats
        notes.append(f"input {spec.name!r} takes {len(feats)} columns in {path.name}'s order ({', '.join(feats[:6])}"
                     f"{', ...' if len(feats) > 6 else ''}); other files are matched by these names. To fix the order "
                     f"the model was trained with, declare [columns] {spec.name} = [...] in kiln.toml or --columns")
    used = {c for v in cols.values() for c in v}
    ignored = [n for n in names if n not in used and n != idc]
    if ignored:
        notes.append(f"table columns not used: {', '.join(ignored[:10])}{' ...' if len(ignored) > 10 else ''}")
    return TableLayout(cols, idc), notes


def _read_table(path: Path, specs: list[TensorSpec], layout: TableLayout) -> tuple[list[np.ndarray], list[str] | None]:
    import pyarrow.compute  # noqa: F401  (registers compute kernels used by to_numpy)

    table = _open_table(path)
    missing = [c for cs in layout.columns.values() for c in cs if c not in table.column_names]
    if layout.id_column and layout.id_column not in table.column_names:
        missing.append(layout.id_column)
    if missing:
        raise KilnError(f"{path} lacks columns {missing[:10]} (it has {table.column_names[:20]})",
                        hint="every table must carry the columns of the first one; they are matched by name")
    arrays = []
    for spec in specs:
        cs = layout.columns[spec.name]
        if len(cs) == 1 and _is_list(table.schema.field(cs[0]).type):
            col = table.column(cs[0]).combine_chunks()
            flat = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64 if spec.torch_dtype.is_floating_point else np.int64)
            a = flat.reshape(len(col), -1)
        elif len(cs) == 1 and len(spec.shape) == 1:
            a = _column(table, cs[0])
        else:
            a = np.stack([_column(table, c) for c in cs], axis=1) if cs else np.zeros((table.num_rows, 0))
        arrays.append(a)
    ids = None
    if layout.id_column:
        ids = [str(v) for v in table.column(layout.id_column).to_pylist()]
    return arrays, ids


def _column(table: Any, name: str) -> np.ndarray:
    """One column as numbers; a missing value becomes NaN (its row is then reported, never run)."""
    col = table.column(name)
    if col.null_count:
        return np.asarray(col.to_numpy(zero_copy_only=False), np.float64)
    return np.asarray(col.to_numpy())


def collect(paths: list[str | Path], specs: list[TensorSpec], preprocess: Preprocess, *,
            columns: dict[str, list[str]] | None = None, id_column: str | None = None) -> tuple[Inputs, list[tuple[str, str]]]:
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
        fit = preprocess.fit_size(specs[0])
        notes = _resized_note(images, fit)
        return Inputs(specs, [str(f) for f in images], "images", images, [], preprocess, fit=fit, notes=notes), bad
    kind = kinds[0] if kinds else "arrays"
    chosen = tables if kind == "table" else arrays
    layout, notes = None, []
    for first in tables:  # the first readable table decides the columns; unreadable ones are listed below
        try:
            layout, notes = table_layout(first, specs, columns, id_column)
            break
        except KilnError as e:
            if not e.message.startswith("cannot read"):
                raise
    ids: list[str] = []
    where: list[Any] = []
    keep: list[Path] = []
    for f in chosen:
        try:
            if kind == "table" and layout is None:
                raise KilnError(f"cannot read {f}: no table here could be read")
            loaded = read_arrays(f, specs, kind, layout)
        except KilnError as e:
            bad.append((str(f), e.message))
            continue
        n = len(loaded.arrays[0])
        k = len(keep)
        keep.append(f)
        ids += loaded.ids if loaded.ids is not None else [f"{f}:{r}" for r in range(n)]
        where += [(k, r) for r in range(n)]
    return Inputs(specs, ids, kind, keep, where, preprocess, layout=layout, notes=notes), bad


def _resized_note(images: list[Path], fit: tuple[int, int] | None) -> list[str]:
    """Count the images that are not the model's size (their headers only), to say they are resized."""
    if fit is None:
        return []
    from PIL import Image

    other = 0
    for f in images:
        try:
            with Image.open(f) as im:
                other += (im.height, im.width) != fit
        except Exception:  # unreadable: reported per item when it is fetched
            continue
    if not other:
        return []
    return [f"{other} of {len(images)} images are not {fit[0]}x{fit[1]} (height x width): resized to it, bilinear; "
            "set [preprocess] resize/crop in kiln.toml to control it"]
