"""Session fixtures: the zoo's weights on disk, and each zoo model built once (AOTInductor is slow)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.torch import save_model

import kiln

sys.path.insert(0, str(Path(__file__).parent))
import zoo
from support import ZOO

os.environ.setdefault("KILN_ORT_THREADS", "1")  # two cores, and pytest is not alone on them
# AOTInductor compiles its C++ wrapper (glue around the kernels) at -O1; for the suite's tiny models that compile is
# most of an AOTI build, and -O0 takes 1-2 s less per package (the kernels keep -O3). Builds in subprocesses
# (make demo, the CLI tests) inherit it.
os.environ.setdefault("AOT_INDUCTOR_COMPILE_WRAPPER_OPT_LEVEL", "O0")


@pytest.hookimpl(tryfirst=True)  # before xdist's own, which turns the groups into node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`make test` runs the suite on two pytest-xdist workers (--dist loadgroup): each file's tests go to one
    worker, so a module's fixtures are made once, and every test that starts Ray goes to the same one, in order
    (the cluster test's `ray start` cluster must be gone before another test starts a Ray of its own)."""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        ray = "on_ray" in item.path.parts or item.name.startswith("test_ray_")
        item.add_marker(pytest.mark.xdist_group("ray" if ray else str(item.path)))


@pytest.fixture(scope="session")
def weights_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("weights")
    for name in zoo.SPECS:
        save_model(zoo.seeded(getattr(zoo, name)), str(d / f"{name}.safetensors"))
    return d


@pytest.fixture(scope="session")
def session_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="session")
def built(weights_dir: Path, session_repo: Path) -> Callable[[str], kiln.BuildResult]:
    """built("MLP") -> the BuildResult of that zoo model with every backend, built once per session."""
    cache: dict[str, kiln.BuildResult] = {}

    def get(name: str) -> kiln.BuildResult:
        if name not in cache:
            # fp32 per backend (BN folded where there is BN) and ONNX Runtime's int8; fp16/bf16 and torch-side int8
            # have their own tests (on a CPU whether halves are tried depends on what the probe measures).
            cache[name] = kiln.build(f"{ZOO}:{name}", weights=weights_dir / f"{name}.safetensors",
                                     inputs=zoo.SPECS[name], repo=session_repo, batch=(1, 8),
                                     variants=["*/fp32", "*/fp32+bnfold", "onnxruntime/int8*"])
        return cache[name]

    return get


@pytest.fixture(scope="session")
def digits_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits example built with the fast backends (eager reference + onnxruntime)."""
    from support import DIGITS

    repo = tmp_path_factory.mktemp("digits")
    kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
               repo=repo, backends=("eager", "onnxruntime"), precision="fp32")
    return repo / "digits"


@pytest.fixture(scope="session")
def serve_repo(tmp_path_factory: pytest.TempPathFactory, weights_dir: Path) -> Path:
    """Models for the serving tests: digits, a two-input two-output model, and eager-only poison/slow models."""
    from support import DIGITS

    repo = tmp_path_factory.mktemp("serve")
    fast = ("eager", "onnxruntime")
    kiln.build(f"{DIGITS}/model.py:DigitsNet", weights=DIGITS / "digits.safetensors", data=DIGITS / "test.npz",
               repo=repo, backends=fast, precision="fp32")
    kiln.build(f"{ZOO}:TwoInTwoOut", weights=weights_dir / "TwoInTwoOut.safetensors", inputs=zoo.SPECS["TwoInTwoOut"],
               name="two", repo=repo, backends=fast, precision="fp32")
    for name, specs in zoo.SERVE_SPECS.items():
        kiln.build(f"{ZOO}:{name}", inputs=specs, name=name.lower(), repo=repo, backends=("eager",), batch=(1,))
    (repo / "poison" / "config.toml").write_text("max_delay_ms = 100\nmax_batch_size = 16\n")
    (repo / "slow" / "config.toml").write_text("max_batch_size = 1\nmax_queue_size = 2\ninstances = 1\n")
    return repo
