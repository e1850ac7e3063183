"""Self-contained artifacts: every file the model imports from its own folder is copied into the variant, hashed,
and loaded from there; the build machine's paths never reach kiln.json."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest

import kiln
from kiln.errors import KilnError

MODEL = """
import torch
from torch import nn

import layers
from blocks.act import Act


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.body = layers.Body(6)
        self.act = Act()

    def forward(self, x):
        return self.act(self.body(x))
"""
LAYERS = """
from torch import nn

SCALE = {scale}


class Body(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.fc = nn.Linear(n, 3)

    def forward(self, x):
        return self.fc(x) * SCALE
"""
ACT = """
import torch
from torch import nn


class Act(nn.Module):
    def forward(self, x):
        return torch.tanh(x)
"""


def _model_folder(root: Path, *, scale: float = 1.0) -> Path:
    folder = root / "src"
    (folder / "blocks").mkdir(parents=True)
    (folder / "model.py").write_text(textwrap.dedent(MODEL))
    (folder / "layers.py").write_text(textwrap.dedent(LAYERS.format(scale=scale)))
    (folder / "blocks" / "__init__.py").write_text("")
    (folder / "blocks" / "act.py").write_text(textwrap.dedent(ACT))
    return folder


def _build(folder: Path, repo: Path, name: str = "net") -> kiln.BuildResult:
    return kiln.build(f"{folder}/model.py:Net", inputs=["x:float32[batch,6]"], repo=repo, name=name,
                      backends=("eager", "onnxruntime"), precision="fp32", report=False)


X = np.linspace(-1, 1, 12, dtype=np.float32).reshape(2, 6)


def test_local_modules_are_copied_hashed_and_loaded_from_the_artifact(tmp_path: Path) -> None:
    folder = _model_folder(tmp_path)
    r = _build(folder, tmp_path / "repo")
    assert r.path is not None
    expected = np.asarray(kiln.load(r.path, variant="eager/fp32")(X))
    m = json.loads((r.path / "kiln.json").read_text())
    assert set(m["source"]["files"]) == {"model.py", "layers.py", "blocks/__init__.py", "blocks/act.py"}
    eager = next(c for c in m["candidates"] if c["variant"] == "eager/fp32")
    assert {"code/model.py", "code/layers.py", "code/blocks/act.py", "weights.safetensors"} <= set(eager["artifact"]["files"])
    text = (r.path / "kiln.json").read_text()
    assert str(tmp_path) not in text and str(folder) not in text, "a build machine path reached kiln.json"

    # The original folder changes (its sibling now fails on import) or disappears: the artifact does not care.
    (folder / "layers.py").write_text("raise RuntimeError('the build folder was used at load time')\n")
    moved = tmp_path / "elsewhere" / "repo"
    shutil.copytree(tmp_path / "repo", moved)
    shutil.rmtree(folder)
    shutil.rmtree(tmp_path / "repo")
    for variant in ("eager/fp32", "onnxruntime/fp32"):
        got = kiln.load(moved / "net", variant=variant)(X)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_an_edited_copy_is_refused_with_the_file_named(tmp_path: Path) -> None:
    r = _build(_model_folder(tmp_path), tmp_path / "repo")
    assert r.path is not None
    copy = next(r.path.glob("variants/eager-fp32/code/layers.py"))
    copy.write_text(copy.read_text().replace("SCALE = 1.0", "SCALE = 2.0"))
    with pytest.raises(KilnError, match=r"code/layers\.py.*modified after the build"):
        kiln.load(r.path, variant="eager/fp32")


def test_same_named_siblings_of_two_models_stay_apart(tmp_path: Path) -> None:
    a = _build(_model_folder(tmp_path / "a", scale=1.0), tmp_path / "repo", name="a")
    b = _build(_model_folder(tmp_path / "b", scale=3.0), tmp_path / "repo", name="b")
    assert a.path is not None and b.path is not None
    ya = kiln.load(a.path, variant="eager/fp32")(X)
    yb = kiln.load(b.path, variant="eager/fp32")(X)
    assert not np.allclose(ya, yb)
    np.testing.assert_allclose(kiln.load(a.path, variant="eager/fp32")(X), ya)  # loading b did not change a


def test_an_import_from_outside_the_folder_fails_the_build(tmp_path: Path) -> None:
    outside = tmp_path / "shared"
    outside.mkdir()
    (outside / "helpers_outside.py").write_text("from torch import nn\nLayer = nn.Linear\n")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "model.py").write_text(textwrap.dedent(f"""
        import sys
        sys.path.append({str(outside)!r})
        import helpers_outside

        def Net():
            return helpers_outside.Layer(4, 2)
        """))
    with pytest.raises(KilnError, match="helpers_outside") as e:
        kiln.build(f"{folder}/model.py:Net", inputs=["x:float32[batch,4]"], repo=tmp_path / "repo",
                   backends=("eager",), report=False)
    assert e.value.hint and "beside the model file" in e.value.hint
