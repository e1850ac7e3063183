"""Apache TVM: torch.export -> Relax (`from_exported_program`) -> a compiled library (model.so) run by the Relax VM.

Two builds:
- untuned (`--tvm-trials 0`): one library with the model's dynamic dims kept symbolic, TVM's default schedules
  (where Relax cannot build the model with symbolic shapes, the same untuned build at static shapes, as below);
- tuned (`--tvm-trials N`, 32 by default): MetaSchedule searches schedules under a budget of N trials in all; its
  tuning records need static shapes, so there is one library per build batch size (a "bucket"), every other
  dynamic dim fixed at its --dim-size. A call runs in the smallest bucket that holds its batch (padded), and a
  batch past the largest in slices. The tuning database is saved with the artifact (tuning/) and cached under
  $KILN_CACHE/tvm by graph and target, so rebuilding the same model on the same CPU reuses it without new trials.

Target: this CPU (`llvm` with its `mcpu`). Cross-compiling the library for another CPU is `tvm_target` below with
e.g. {"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mcpu": "cortex-a76"} or "riscv64-linux-gnu"; such a
library is built, not run, here (see the README). Untuned TVM is slower than eager on a CPU: selection keeps it only
when measured faster, like every variant.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.backends.common import (
    Subject,
    Target,
    cpu_only,
    exportable_module,
    first_line,
    quiet,
    recipe_of,
    torch_dynamic_shapes,
)
from kiln.data import batch_dim
from kiln.errors import KilnError, Skip
from kiln.recipe import Recipe
from kiln.runner import Runner
from kiln.signature import FlatModel
from kiln.spec import TensorSpec, synthetic, to_tensor

NAME = "tvm"
DEFAULT = False  # tuning takes minutes: --backends all (or naming it) adds it
RANK = 50
COST = 20.0  # tuning dominates
TUNING = "tuning"


def variants(t: Target) -> list[Recipe]:
    return [Recipe("fp32")]


def _tvm() -> Any:
    try:
        with quiet("tvm"):
            import tvm
            from tvm import relax  # noqa: F401
    except ImportError as e:
        if getattr(e, "name", None) == "tvm":
            raise Skip("apache-tvm is not installed (pip install 'kiln[tvm]')") from None
        raise Skip(f"apache-tvm is installed but does not import here: {first_line(e)}") from None
    return tvm


def tvm_target(spec: dict[str, Any] | None = None) -> Any:
    """This CPU as a TVM target (LLVM's name for it; `-mcpu=native` is refused by TVM's bundled LLVM), or `spec`."""
    tvm = _tvm()
    if spec is None:
        spec = {"kind": "llvm", "mtriple": "x86_64-linux-gnu" if os.uname().machine == "x86_64" else f"{os.uname().machine}-linux-gnu",
                "mcpu": tvm.target.codegen.llvm_get_system_cpu(), "num-cores": os.cpu_count() or 1}
    return tvm.target.Target(spec)


def cache_dir() -> Path:
    return Path(os.environ.get("KILN_CACHE", Path.home() / ".cache" / "kiln")) / "tvm"


def _relax(flat: torch.nn.Module, examples: tuple[torch.Tensor, ...], shapes: Any) -> tuple[Any, list[np.ndarray]]:
    from tvm import relax
    from tvm.relax.frontend.torch import from_exported_program

    ep = torch.export.export(flat, examples, dynamic_shapes=shapes, strict=False)
    mod = from_exported_program(ep, keep_params_as_input=True)
    mod, params = relax.frontend.detach_params(mod)
    return mod, [p.numpy() for p in params.get("main", [])]


def export(subject: Subject, directory: Path, *, options: dict[str, Any]) -> dict[str, Any]:
    cpu_only(subject.device, "TVM libraries (llvm)")
    module = exportable_module(subject, NAME)
    recipe = recipe_of(options)
    if recipe.tag != "fp32":
        raise Skip(f"kiln builds TVM variants in fp32 only, not {recipe.tag}")
    tvm = _tvm()
    from tvm import relax

    trials = int(options.get("tvm_trials", 32))
    target = tvm_target()
    flat = FlatModel(module).eval()
    batch_sizes = sorted(set(options.get("batch_sizes", [1])))
    dim_sizes = options.get("dim_sizes") or {}
    batch = batch_dim(subject.inputs)
    t0 = time.perf_counter()
    other = {n for s in subject.inputs for n in s.dynamic_dims.values() if n != batch}
    missing = sorted(n for n in other if n not in dim_sizes)

    def static(tune: bool) -> tuple[list[dict[str, Any]], str, list[np.ndarray]]:
        """One library per build batch size, every other dim fixed at its --dim-size; tuned when `tune`."""
        libs: list[dict[str, Any]] = []
        params: list[np.ndarray] = []
        tuned = "untuned, static shapes"
        per = max(1, trials // max(1, len(batch_sizes)))
        for b in batch_sizes if batch else [None]:
            mod, params = _relax(flat, _static_examples(subject.inputs, b, batch, dim_sizes), None)
            if tune:
                mod, tuned = _tune(mod, target, per, directory / TUNING / f"b{b or 0}", subject)
            else:
                with target:
                    mod = relax.get_pipeline("zero")(mod)
            name = f"model.b{b}.so" if b else "model.so"
            tvm.compile(mod, target=target).export_library(str(directory / name))
            libs.append({"file": name, "batch": b})
        return libs, tuned, params

    try:
        with quiet("tvm"):
            if trials <= 0:
                try:
                    mod, params = _relax(flat, tuple(subject.examples), torch_dynamic_shapes(subject.inputs))
                    with target:
                        mod = relax.get_pipeline("zero")(mod)
                    tvm.compile(mod, target=target).export_library(str(directory / "model.so"))
                    libs, tuned = [{"file": "model.so", "batch": None}], "untuned"
                except Exception as e:
                    if missing:
                        raise
                    # Relax's frontend handles fewer ops with symbolic shapes than with static ones (HF BERT's
                    # attention, for one): the same untuned build at the build's shapes, one library per batch size.
                    subject.notes.append(f"tvm: the dynamic-shape build failed ({type(e).__name__}: {first_line(e)[:120]}); "
                                         "built at static shapes instead")
                    libs, tuned, params = static(tune=False)
            else:
                if missing:
                    raise Skip(f"tuned TVM builds at static shapes: give --dim-size for {', '.join(missing)} "
                               "(or --tvm-trials 0 for an untuned build with dynamic dims)")
                libs, tuned, params = static(tune=True)
    except (Skip, KilnError):
        raise
    except Exception as e:
        raise KilnError(f"TVM build failed: {type(e).__name__}: {first_line(e)}",
                        hint="the model uses an operator TVM's Relax torch frontend lacks; the other variants still apply") from None
    np.savez(directory / "params.npz", *params)
    seconds = time.perf_counter() - t0
    subject.notes.append(f"tvm: {tuned} build in {seconds:.0f}s for {target.attrs.get('mcpu', 'llvm')}")
    return {"libs": libs, "recipe": recipe.tag, "tvm": tvm.__version__, "target": str(target.export()),
            "mcpu": str(target.attrs.get("mcpu", "")), "trials": max(0, trials), "tuning_s": round(seconds, 1),
            "tuned": tuned, "params": "params.npz", "n_params": len(params)}


def _static_examples(inputs: list[TensorSpec], b: int | None, batch: str | None, dim_sizes: dict[str, int]) -> tuple[torch.Tensor, ...]:
    sizes = {**dim_sizes, **({batch: b} if batch and b else {})}
    rng = np.random.default_rng(0)
    return tuple(to_tensor(synthetic(s, sizes, rng), s) for s in inputs)


def _cpu_intrinsics_only() -> None:
    """MetaSchedule imports `tvm.s_tir.tensor_intrin` when tuning starts, whose package import registers every
    tensor intrinsic, CUDA's mma/wmma/ldmatrix included, by parsing their TVMScript: 64 s on 2 cores here, against
    2.3 s for the CPU ones, and the builder's worker process (restarted for every batch of candidates) does the same.
    kiln tunes for the CPU only, so here and in those workers the package is entered without its __init__ and only
    the CPU intrinsics are imported; its other submodules (cuda ...) still import on demand."""
    import importlib
    import importlib.util
    import sys
    import types

    name = "tvm.s_tir.tensor_intrin"
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return
    package = types.ModuleType(name, "Intrinsics for tensorization (CPU ones only, imported by kiln)")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    sys.modules[name] = package
    try:
        for cpu in ("x86", "arm_cpu"):
            importlib.import_module(f"{name}.{cpu}")
    except Exception:  # leave no half-made package behind: TVM's own import then runs (and says what is wrong)
        for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
            del sys.modules[k]
        raise


def _tune(mod: Any, target: Any, trials: int, work: Path, subject: Subject) -> tuple[Any, str]:
    """MetaSchedule over `trials` trials, or the cached database of an earlier build of this graph on this target."""
    import tvm
    from tvm import relax
    from tvm.s_tir import meta_schedule as ms

    with target:
        mod = tvm.transform.Sequential([relax.transform.DecomposeOpsForInference(), relax.transform.CanonicalizeBindings(),
                                        relax.get_pipeline("zero")])(mod)
    key = hashlib.sha256(f"{tvm.ir.save_json(mod)}|{target.export()}|{trials}".encode()).hexdigest()[:24]
    cached = cache_dir() / key
    if (cached / "database_tuning_record.json").is_file():
        shutil.copytree(cached, work, dirs_exist_ok=True)
        subject.notes.append(f"tvm: tuning database reused from the cache ({cached})")
        how = f"tuning reused ({trials} trials)"
    else:
        work.mkdir(parents=True, exist_ok=True)
        _cpu_intrinsics_only()
        ms.relax_integration.tune_relax(mod, {}, target, str(work), max_trials_global=trials,
                                        num_trials_per_iter=min(16, trials),
                                        builder=ms.builder.LocalBuilder(timeout_sec=600, max_workers=1,
                                                                       initializer=_cpu_intrinsics_only),
                                        runner=ms.runner.LocalRunner(timeout_sec=60))
        shutil.rmtree(work / "logs", ignore_errors=True)
        records = (work / "database_tuning_record.json").read_text().strip().splitlines()
        if not records:
            raise KilnError(f"MetaSchedule measured no valid schedule in {trials} trials",
                            hint="raise --tvm-trials, or --tvm-trials 0 for an untuned build")
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(work, cached, dirs_exist_ok=True)
        how = f"tuned ({trials} trials, {len(records)} records)"
    with target:
        mod = relax.transform.MetaScheduleApplyDatabase(str(work))(mod)
    return mod, how


def compatible(meta: dict[str, Any]) -> str | None:
    try:
        import tvm
    except ImportError:
        return "apache-tvm is not installed here (pip install 'kiln[tvm]')"
    here = tvm.target.codegen.llvm_get_system_cpu()
    if meta.get("mcpu") and meta["mcpu"] != here:
        return f"the TVM library was compiled for {meta['mcpu']}, this CPU is {here}"
    return None


def load(directory: Path, meta: dict[str, Any], inputs: list[TensorSpec], outputs: list[TensorSpec],
         *, device: str = "cpu", threads: int | None = None) -> Runner:
    cpu_only(device, "TVM libraries")
    tvm = _tvm()
    from tvm import relax

    z = np.load(directory / meta.get("params", "params.npz"))
    params = [tvm.runtime.tensor(z[f"arr_{i}"]) for i in range(int(meta.get("n_params", len(z.files))))]
    vms: list[tuple[int | None, Any]] = []
    try:
        for lib in meta["libs"]:
            vms.append((lib["batch"], relax.VirtualMachine(tvm.runtime.load_module(str(directory / lib["file"])), tvm.cpu())))
    except Exception as e:
        raise KilnError(f"TVM cannot load the library in {directory}: {first_line(e)}",
                        hint="the library is corrupt or was built for another CPU; rebuild the model") from None
    vms.sort(key=lambda v: v[0] or 0)
    lock = threading.Lock()

    def call(vm: Any, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with lock:
            out = vm["main"](*(tvm.runtime.tensor(np.ascontiguousarray(x.numpy(force=True))) for x in xs), *params)
        items = [out] if hasattr(out, "numpy") else list(out)
        return [torch.from_numpy(o.numpy().copy()) for o in items]

    def fn(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        if vms[0][0] is None:  # dynamic shapes
            return call(vms[0][1], xs)
        n = xs[0].shape[0]
        top = vms[-1][0]
        assert top is not None
        if n > top:
            parts = [fn([x[i:i + top] for x in xs]) for i in range(0, n, top)]
            return [torch.cat(col) for col in zip(*parts)]
        b, vm = next(v for v in vms if (v[0] or 0) >= n)
        if b is not None and b != n:  # pad to the bucket with copies of the last item, then drop the padding
            xs = [torch.cat([x, x[-1:].expand(b - n, *x.shape[1:])]) for x in xs]
        return [o[:n] for o in call(vm, xs)]

    return Runner(f"{NAME}/{meta.get('recipe', 'fp32')}", inputs, outputs, fn, device,
                  {"tuned": meta.get("tuned"), "buckets": [b for b, _ in vms]})
