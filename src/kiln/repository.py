"""Model repository: repo/<model>/<version>/{kiln.json, variants/<variant>/...}. Build writes, serve loads."""

from __future__ import annotations

import inspect
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from kiln import backends
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.source import sha256_file
from kiln.spec import TensorSpec
from kiln.transforms import trim

MANIFEST = "kiln.json"
FORMAT = 1
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")


MAX_NAME = 128


def check_name(name: str) -> str:
    """A model name is one safe path component: letters, digits, '_', '-', '.', not starting with '.', <= 128."""
    if len(name) > MAX_NAME or not _NAME_RE.match(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise KilnError(f"invalid model name {shown!r}",
                        hint=f"use up to {MAX_NAME} letters, digits, '_', '-' and '.', starting with a letter or digit")
    return name


def variant_dir(variant: str) -> str:
    return variant.replace("/", "-").replace("+", "_")


def versions(model_dir: Path) -> list[int]:
    if not model_dir.is_dir():
        return []
    return sorted(int(p.name) for p in model_dir.iterdir() if p.name.isdigit() and (p / MANIFEST).is_file())


def version_rows(model_dir: Path) -> list[dict[str, Any]]:
    """One row per version of a model, newest first: version, date, selected variant, objective, size on disk.
    A version whose kiln.json cannot be read is listed with the error instead of being skipped."""
    rows = []
    for v in reversed(versions(model_dir)):
        d = model_dir / str(v)
        size = sum(f.stat().st_size for f in d.rglob("*") if f.is_file())
        try:
            m = json.loads((d / MANIFEST).read_text())
            rows.append({"version": v, "created": m.get("created", "?"), "selected": m.get("selected"),
                         "objective": m.get("objective"), "bytes": size, "path": d})
        except (OSError, json.JSONDecodeError) as e:
            rows.append({"version": v, "created": "?", "selected": None, "objective": None, "bytes": size, "path": d,
                         "error": f"unreadable kiln.json: {e}"})
    return rows


def prune_versions(model_dir: Path, keep: int) -> list[int]:
    """Delete all but the newest `keep` versions; returns the versions removed. The newest is never removed."""
    if keep < 1:
        raise KilnError(f"--keep {keep}", hint="keep at least 1 version (the newest is what `kiln serve` loads)")
    old = versions(model_dir)[:-keep]
    for v in old:
        shutil.rmtree(model_dir / str(v))
    return old


def new_version_dir(repo: Path, name: str) -> tuple[int, Path]:
    """Reserve the next version number atomically (mkdir fails if a concurrent build took it)."""
    model_dir = repo / check_name(name)
    model_dir.mkdir(parents=True, exist_ok=True)
    taken = [int(p.name) for p in model_dir.iterdir() if p.name.isdigit()]
    v = max(taken, default=0) + 1
    while True:
        try:
            (model_dir / str(v)).mkdir()
            return v, model_dir / str(v)
        except FileExistsError:
            v += 1


def hash_dir(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.rglob("*")) if p.is_file()}


def add_artifact(version_dir: Path, variant: str, staged: Path) -> dict[str, Any]:
    """Move a staged artifact folder into the version and describe its files by sha256."""
    dest = version_dir / "variants" / variant_dir(variant)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(staged, dest)
    files = hash_dir(dest)
    return {"dir": str(dest.relative_to(version_dir)), "files": files,
            "bytes": sum((dest / f).stat().st_size for f in files)}


def write_manifest(version_dir: Path, manifest: dict[str, Any]) -> None:
    tmp = version_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, version_dir / MANIFEST)


def resolve(path: str | Path) -> tuple[Path, dict[str, Any]]:
    """`repo/<model>` (latest version) or `repo/<model>/<version>` -> (version dir, manifest)."""
    p = Path(path)
    if not p.exists():
        raise KilnError(f"no model at {p}", hint="build one with `kiln build ... --repo DIR`, then give DIR/<name>")
    if not (p / MANIFEST).is_file():
        vs = versions(p)
        if not vs:
            raise KilnError(f"{p} holds no built version (no {MANIFEST})", hint="give repo/<model> or repo/<model>/<version>")
        p = p / str(vs[-1])
    try:
        manifest = json.loads((p / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise KilnError(f"cannot read {p / MANIFEST}: {e}", hint="the manifest is corrupt; rebuild the model") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise KilnError(f"{p / MANIFEST} has format {manifest.get('format') if isinstance(manifest, dict) else '?'}, "
                        f"this kiln reads format {FORMAT}", hint="rebuild the model with this version of kiln")
    return p, manifest


def candidate(manifest: dict[str, Any], variant: str | None = None) -> dict[str, Any]:
    want = variant or manifest.get("selected")
    for c in manifest.get("candidates", []):
        if c["variant"] == want:
            if c.get("status") != "accepted":
                raise KilnError(f"variant {want} was {c.get('status')} at build time: {c.get('reason', '')}",
                                hint="pick an accepted variant (kiln inspect lists them)")
            return c
    accepted = [c["variant"] for c in manifest.get("candidates", []) if c.get("status") == "accepted"]
    raise KilnError(f"no variant {want!r} in this model", hint=f"accepted variants: {', '.join(accepted)}")


def _inside(base: Path, rel: object, what: str) -> Path:
    """`base / rel`, refused unless it stays inside `base` (no absolute paths, no '..', no symlink out)."""
    if not isinstance(rel, str) or not rel or Path(rel).is_absolute() or ".." in Path(rel).parts:
        raise KilnError(f"{MANIFEST} names {what} {rel!r}, which is not a relative path inside its version folder",
                        hint="the manifest was edited or is corrupt; rebuild the model")
    path = base / rel
    try:
        path.resolve().relative_to(base.resolve())
    except ValueError:
        raise KilnError(f"{what} {rel!r} resolves outside its version folder", hint="remove the symlink or rebuild") from None
    return path


def verify_artifact(version_dir: Path, entry: dict[str, Any]) -> Path:
    """Refuse an artifact whose files were changed, removed or added since the build, or whose manifest points
    outside its version folder. Every path a backend may open is one of the hashed files."""
    art = entry.get("artifact")
    if not isinstance(art, dict) or not isinstance(art.get("files"), dict):
        raise KilnError(f"{MANIFEST} has no artifact for {entry.get('variant')}", hint="rebuild the model")
    directory = _inside(version_dir, art.get("dir"), "artifact folder")
    if not directory.is_dir():
        raise KilnError(f"artifact folder missing: {art['dir']}", hint="the model folder is incomplete; copy it again or rebuild")
    expected: dict[str, str] = art["files"]
    for name, digest in expected.items():
        f = _inside(directory, name, "artifact file")
        if f.is_symlink() or not f.is_file():
            raise KilnError(f"artifact file missing: {art['dir']}/{name}",
                            hint="the model folder is incomplete; copy it again or rebuild")
        if sha256_file(f) != digest:
            raise KilnError(f"artifact {art['dir']}/{name} does not match its sha256 in {MANIFEST}: it was modified after "
                            "the build", hint="restore the original file or rebuild the model; kiln will not load a "
                            "tampered artifact")
    present = {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() or p.is_symlink()}
    extra = sorted(present - set(expected))
    if extra:
        raise KilnError(f"unexpected files in artifact {art['dir']}: {', '.join(extra[:10])}",
                        hint="remove them or rebuild the model")
    meta = art.get("meta") or {}
    named = [meta.get("file")] if meta.get("file") is not None else []
    named += list(meta.get("code") or [])
    for rel in named:  # a backend opens only files that are listed, and therefore hashed
        if rel not in expected:
            raise KilnError(f"the artifact's meta names {rel!r}, which is not among its hashed files",
                            hint="the manifest was edited; rebuild the model")
    return directory


def load(path: str | Path, *, device: str = "cpu", variant: str | None = None, threads: int | None = None,
         spin: bool = True) -> Runner:
    """Load the selected (or named) variant of a built model, after checking its integrity.
    `threads` sets the intra-op threads of runtimes that own a thread pool (ONNX Runtime); torch's are per process.
    `spin=False` lets that pool's idle threads sleep rather than busy-wait (a server's front end needs the CPU).

    >>> runner = kiln.load("models/digits", device="cpu")
    """
    version_dir, manifest = resolve(path)
    entry = candidate(manifest, variant)
    directory = verify_artifact(version_dir, entry)
    backend = backends.get(entry["backend"])
    meta = entry["artifact"]["meta"]
    compat = getattr(backend, "compatible", None)
    reason = compat(meta) if compat else None
    if reason:
        raise KilnError(f"cannot load {entry['variant']} from {version_dir}: {reason}",
                        hint="rebuild the model with the libraries installed here, or install the versions it was built with")
    inputs = [TensorSpec.from_dict(s) for s in manifest["inputs"]]
    outputs = [TensorSpec.from_dict(s) for s in manifest["outputs"]]
    try:
        extra = {} if spin or "spin" not in inspect.signature(backend.load).parameters else {"spin": False}
        runner: Runner = backend.load(directory, meta, inputs, outputs, device=device, threads=threads, **extra)
    except Skip as e:
        raise KilnError(f"cannot load {entry['variant']} on {device}: {e}",
                        hint="pick another device, or another variant with variant=...") from None
    if Recipe.parse(entry["variant"].split("/", 1)[1]).has("trim"):
        runner = trim.wrap(runner)
    runner.variant = entry["variant"]
    runner.as_dict = manifest.get("output_structure") == "dict"
    runner.info.update(model=manifest["name"], version=manifest["version"])
    return runner
