"""ModelSource: where a model comes from, and loading it without unpickling arbitrary objects."""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import pickle
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import torch
from torch import nn

from kiln.errors import KilnError

SourceKind = Literal["python", "torchscript", "exported", "onnx"]
_WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".safetensors")
_SAVE_HINT = "save weights with torch.save(model.state_dict(), 'model.pth') or safetensors.torch.save_model(model, 'model.safetensors')"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelSource:
    """A parsed SOURCE argument: `file.py:attr`, `pkg.module:attr`, `.pt` (TorchScript), `.pt2`, `.onnx`.

    >>> src = ModelSource.parse("examples/digits/model.py:DigitsNet", weights="digits.safetensors")
    """

    kind: SourceKind
    text: str
    path: Path | None = None
    module: str | None = None
    attr: str | None = None
    weights: Path | None = None
    sha256: str = ""
    weights_sha256: str | None = None
    notes: list[str] = field(default_factory=list)
    local_files: list[str] = field(default_factory=list)
    """Files the model imported from its own folder (the model file first), relative to that folder."""
    from_artifact: bool = False
    """The code is an artifact's copy: import it without writing bytecode beside it (it would be an extra file)."""
    instance: nn.Module | None = None
    """An nn.Module given in memory (kiln.build(module)); path/module and attr say how to rebuild it, if they can."""

    @classmethod
    def from_module(cls, model: nn.Module) -> ModelSource:
        """kiln.build(module): the module is used as given (a copy). Variants that carry code (eager, compile) need
        its class to be rebuilt with no arguments from its file or installed package; when it cannot be (defined in
        __main__ or a notebook, or its constructor needs arguments), those variants are skipped and say why."""
        import inspect

        klass = type(model)
        name, qual = klass.__module__, klass.__qualname__
        text = f"<in-memory {qual}>"
        weights_sha = state_dict_sha256(model)
        mod = sys.modules.get(name)
        file = getattr(mod, "__file__", None)
        why = ""
        if name == "__main__" or file is None:
            why = f"its class {qual} is defined in {'__main__ (a script or notebook)' if name == '__main__' else name}"
        elif "." in qual:
            why = f"its class {qual} is defined inside a function or class, where no import reaches it"
        else:
            try:
                required = [p.name for p in inspect.signature(klass).parameters.values()
                            if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            except (TypeError, ValueError):
                required = []
            if required:
                why = f"{qual}() needs arguments ({', '.join(required)})"
        if why:
            return cls("python", text, attr=klass.__name__, weights_sha256=weights_sha, instance=model, notes=[
                f"{text}: {why}, so the variants that carry model code (eager, compile) cannot rebuild it and are "
                "skipped; the exported ones (torchscript, aoti, onnxruntime) carry the graph. For all of them, "
                "point kiln at a factory: kiln.build('file.py:make_model')"])
        path = Path(file).resolve()  # type: ignore[arg-type]
        installed = any(part in ("site-packages", "dist-packages") for part in path.parts)
        if installed:
            return cls("python", text, module=name, attr=qual, weights_sha256=weights_sha, instance=model)
        return cls("python", text, path=path, attr=qual, sha256=sha256_file(path), weights_sha256=weights_sha,
                   instance=model)

    @property
    def rebuildable(self) -> bool:
        """Model code can be carried into an artifact (a file or a package to import, and a class to call)."""
        return self.kind != "python" or self.path is not None or self.module is not None

    @classmethod
    def parse(cls, text: str, *, weights: str | Path | None = None) -> ModelSource:
        w = Path(weights) if weights is not None else None
        if w is not None:
            if not w.is_file():
                raise KilnError(f"weights file not found: {w}", hint="check the --weights path")
            if w.suffix not in _WEIGHT_SUFFIXES:
                raise KilnError(
                    f"unknown weights format {w.suffix!r}: {w}",
                    hint="give a state_dict saved as .pth/.pt or a .safetensors file",
                )
        if ":" in text and not Path(text).exists():
            left, attr = text.rsplit(":", 1)
            if not attr.isidentifier():
                raise KilnError(f"bad attribute {attr!r} in {text!r}", hint="write file.py:FactoryOrClass")
            if left.endswith(".py"):
                p = Path(left)
                if not p.is_file():
                    raise KilnError(f"model file not found: {p}", hint="check the path before ':'")
                return cls("python", text, path=p.resolve(), attr=attr, weights=w,
                           sha256=sha256_file(p), weights_sha256=sha256_file(w) if w else None)
            return cls("python", text, module=left, attr=attr, weights=w,
                       weights_sha256=sha256_file(w) if w else None)
        p = Path(text)
        if not p.exists():
            raise KilnError(f"model file not found: {p}", hint="give file.py:Factory, pkg.module:Class, or a .pt/.pt2/.onnx file")
        if w is not None:
            raise KilnError(f"--weights is only for Python sources, not {p.suffix} files",
                            hint="a TorchScript, .pt2 or .onnx file already holds its weights")
        kinds: dict[str, SourceKind] = {".pt": "torchscript", ".pth": "torchscript", ".pt2": "exported", ".onnx": "onnx"}
        if p.suffix in (".mindir", ".ckpt"):
            raise KilnError(f"kiln reads MindSpore models through ONNX, not {p.suffix} files: {p}",
                            hint="in MindSpore: mindspore.onnx.export(net, example_input, file_name='model.onnx', "
                                 "dynamic_axes=...), then: kiln build model.onnx (README: MindSpore)")
        if p.suffix not in kinds:
            raise KilnError(
                f"unknown model file type {p.suffix!r}: {p}",
                hint="kiln reads file.py:Factory with --weights, TorchScript .pt, torch.export .pt2, or .onnx",
            )
        return cls(kinds[p.suffix], text, path=p.resolve(), sha256=sha256_file(p))

    def to_dict(self) -> dict[str, Any]:
        """For kiln.json: names and hashes, never a build machine's absolute path."""
        text = self.text
        if self.path is not None:
            text = self.path.name + (f":{self.attr}" if self.kind == "python" else "")
        out: dict[str, Any] = {
            "kind": self.kind, "text": text, "file": self.path.name if self.path else None,
            "module": self.module, "attr": self.attr, "sha256": self.sha256,
            "weights": self.weights.name if self.weights else None,
            "weights_sha256": self.weights_sha256,
        }
        if self.path is not None and self.local_files:
            out["files"] = {rel: sha256_file(self.path.parent / rel) for rel in self.local_files}
        return out


def state_dict_sha256(model: nn.Module) -> str:
    """A hash of a module's weights (names, dtypes, shapes, bytes), for an in-memory module's manifest."""
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def load_module(src: ModelSource) -> nn.Module:
    """Instantiate the model in eval mode with its weights (an ONNX source through onnx2torch)."""
    if src.instance is not None:
        import copy

        model = copy.deepcopy(src.instance)  # the caller's module is left as it was (no eval(), no folding)
        if src.rebuildable:
            _import_attr(src)  # record the files it imports, so that an artifact carries them
    elif src.kind == "python":
        obj = _import_attr(src)
        try:
            model = obj() if callable(obj) and not isinstance(obj, nn.Module) else obj
        except Exception as e:  # a user's factory can raise anything
            raise KilnError(
                f"calling {src.attr}() from {src.text} raised {type(e).__name__}: {e}",
                hint="the factory or class must build the model with no arguments; wrap it in a function if it needs some",
            ) from None
        if not isinstance(model, nn.Module):
            raise KilnError(f"{src.text} gave a {type(model).__name__}, not a torch.nn.Module",
                            hint="point at a class or factory function that returns an nn.Module")
        if src.weights is not None:
            load_weights(model, src.weights, src.notes)
        else:
            src.notes.append("no --weights given: the model keeps the weights its factory created")
    elif src.kind == "torchscript":
        model = load_torchscript(src.path)  # type: ignore[arg-type]
    elif src.kind == "exported":
        model = ExportedModule(load_exported(src.path).module())  # type: ignore[arg-type]
    else:  # ONNX, converted by onnx2torch (kiln.onnx_import); raises Skip or KilnError when it cannot be
        from kiln.onnx_import import to_torch

        assert src.path is not None
        model = to_torch(src.path, src.notes)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _import_attr(src: ModelSource) -> Any:
    if src.path is not None:
        mod = _import_file(src)
    else:
        try:
            mod = importlib.import_module(src.module)  # type: ignore[arg-type]
        except ImportError as e:
            raise KilnError(f"cannot import module {src.module!r}: {e}",
                            hint="install the package or use path/to/file.py:Factory") from None
    assert src.attr is not None
    if not hasattr(mod, src.attr):
        public = sorted(n for n, v in vars(mod).items() if not n.startswith("_") and callable(v))
        raise KilnError(f"{src.path or src.module} has no attribute {src.attr!r}",
                        hint=f"available: {', '.join(public)[:300]}")
    return getattr(mod, src.attr)


def _under(path: str | None, folder: Path) -> bool:
    if not path:
        return False
    try:
        Path(path).resolve().relative_to(folder)
        return True
    except ValueError:
        return False


def _import_file(src: ModelSource) -> ModuleType:
    """Import a model file as a script would (its folder first on sys.path), and record in `src.local_files`
    every file it pulled in from that folder, so that an artifact can carry copies of all of them.

    Same-named modules imported earlier (another model's `layers.py`) are set aside during the import, so the
    model gets its own folder's modules and every one of them is seen; a folder's modules win afterwards, as
    they would for a script. A model that reaches outside its folder by changing sys.path is refused: kiln
    could not carry those files."""
    assert src.path is not None
    folder = src.path.parent.resolve()
    name = f"kiln_user_{hashlib.sha1(str(src.path).encode()).hexdigest()[:12]}"
    spec = importlib.util.spec_from_file_location(name, src.path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    tops = {p.stem if p.suffix == ".py" else p.name for p in folder.iterdir() if p.suffix == ".py" or (p / "__init__.py").is_file()}
    aside = {n: sys.modules.pop(n) for n in list(sys.modules) if n.split(".")[0] in tops}
    path_before = list(sys.path)
    before = set(sys.modules)
    sys.path.insert(0, str(folder))
    sys.modules[name] = mod
    write_bytecode = sys.dont_write_bytecode
    sys.dont_write_bytecode = write_bytecode or src.from_artifact
    try:
        spec.loader.exec_module(mod)
    except Exception as e:
        sys.modules.pop(name, None)
        raise KilnError(f"importing {src.path} raised {type(e).__name__}: {e}",
                        hint="run `python FILE` to see the full error") from None
    finally:
        sys.dont_write_bytecode = write_bytecode
        added = [p for p in sys.path if p not in path_before and p != str(folder)]
        sys.path[:] = path_before
        new = {n: sys.modules[n] for n in set(sys.modules) - before if n in sys.modules}
        for n, m in aside.items():
            sys.modules.setdefault(n, m)
    files = [src.path.name]
    outside = []
    for n, m in sorted(new.items()):
        f = getattr(m, "__file__", None)
        if n == name or not f:
            continue
        if _under(f, folder):
            rel = str(Path(f).resolve().relative_to(folder))
            if rel not in files:
                files.append(rel)
        elif any(_under(f, Path(p).resolve()) for p in added if p):
            outside.append(f"{n} ({f})")
    if outside:
        raise KilnError(f"{src.path.name} imports {', '.join(outside)} through a sys.path entry it added itself; "
                        "kiln copies only the files in the model's folder into the artifact",
                        hint="move those modules beside the model file, or install them as a package (pip install -e)")
    src.local_files = files
    return mod


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a state_dict from .safetensors or a weights-only torch pickle; never unpickle objects."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise KilnError(f"cannot read safetensors file {path}: {e}", hint="the file is corrupt or not safetensors") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise KilnError(
                f"{path} holds a pickled Python object (likely a whole nn.Module), which kiln refuses to unpickle",
                hint=_SAVE_HINT,
            ) from None
        raise KilnError(f"cannot read weights file {path}: {e}", hint=_SAVE_HINT) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise KilnError(f"cannot read weights file {path}: {e}", hint="the file is corrupt or truncated; " + _SAVE_HINT) from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        if isinstance(obj, dict):  # a training checkpoint: say what it holds and where the weights might be
            keys = sorted(str(k) for k in obj)
            nested = [str(k) for k, v in obj.items() if isinstance(v, dict) and v
                      and all(isinstance(x, torch.Tensor) for x in v.values())]
            hint = (f"the weights look like they are under {nested[0]!r}: save that alone with "
                    f"torch.save(ckpt[{nested[0]!r}], 'model.pth')" if nested else _SAVE_HINT)
            raise KilnError(f"{path} is a dict without a state_dict; its top-level keys are: "
                            f"{', '.join(keys[:20])}", hint=hint)
        raise KilnError(f"{path} does not hold a state_dict (a dict of tensors)", hint=_SAVE_HINT)
    return obj


def load_weights(model: nn.Module, path: Path, notes: list[str] | None = None) -> None:
    """Load a state_dict into `model`, listing every missing, unexpected and mis-shaped key at once. A checkpoint
    saved from a DistributedDataParallel/DataParallel wrapper (every key prefixed `module.`) is loaded with the
    prefix stripped, and a note says so."""
    sd = read_state_dict(path)
    own = model.state_dict()
    if sd and all(k.startswith("module.") for k in sd) and not any(k.startswith("module.") for k in own):
        stripped = {k[len("module."):]: v for k, v in sd.items()}
        if set(stripped) == set(own):
            sd = stripped
            if notes is not None:
                notes.append(f"{path.name}: stripped the 'module.' prefix from every key (saved from "
                             "DistributedDataParallel or DataParallel)")
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        lines = []
        if missing:
            lines.append(f"missing keys ({len(missing)}): {', '.join(missing[:20])}")
        if unexpected:
            lines.append(f"unexpected keys ({len(unexpected)}): {', '.join(unexpected[:20])}")
        if shapes:
            lines.append(f"shape mismatches ({len(shapes)}): {'; '.join(shapes[:20])}")
        prefixes = {k.split(".", 1)[0] for k in unexpected if "." in k}
        hint = "check that the weights were saved from this model class and configuration"
        if unexpected and len(prefixes) == 1 and all(k.startswith(next(iter(prefixes)) + ".") for k in sd):
            prefix = next(iter(prefixes))
            hint = (f"every key in the file starts with '{prefix}.': strip the prefix, e.g. "
                    f"{{k.removeprefix('{prefix}.'): v for k, v in state_dict.items()}}, or point --weights at "
                    "the inner model's weights")
        raise KilnError(f"weights {path} do not fit the model:\n    " + "\n    ".join(lines), hint=hint)
    model.load_state_dict(sd, strict=True)


def load_torchscript(path: Path, map_location: str = "cpu") -> torch.jit.ScriptModule:
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except RuntimeError as e:
        # A torch.save() pickle is a zip too: tell a state_dict apart from a pickled module.
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError:
            raise KilnError(f"{path} is a pickled nn.Module, not TorchScript; kiln refuses to unpickle it",
                            hint="save it with torch.jit.save(torch.jit.script(model), ...) or give the code as file.py:Class with --weights") from None
        except Exception:
            raise KilnError(f"cannot load TorchScript file {path}: {str(e).splitlines()[0]}",
                            hint="the file is corrupt, or not a TorchScript archive") from None
        raise KilnError(f"{path} is a state_dict, not a model",
                        hint=f"pass the model's code as SOURCE (file.py:Class) and this file as --weights {path}") from None


class ExportedModule(nn.Module):
    """An ExportedProgram's module, which raises on .eval(): its train/eval mode was fixed at export."""

    def __init__(self, graph: nn.Module) -> None:
        super().__init__()
        self.graph = graph

    def train(self, mode: bool = True) -> ExportedModule:
        return self

    def forward(self, *args: Any) -> Any:
        return self.graph(*args)


def load_exported(path: Path) -> torch.export.ExportedProgram:
    try:
        return torch.export.load(str(path))
    except Exception as e:  # torch.export.load raises many types on corrupt archives
        raise KilnError(f"cannot load torch.export program {path}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                        hint="save it with torch.export.save(torch.export.export(model, args), 'model.pt2')") from None
