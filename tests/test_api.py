"""The Python API as a notebook user meets it: an nn.Module in memory, the CLI's keyword names, dict outputs."""

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import kiln
import zoo


def test_build_an_in_memory_module_whose_class_lives_in_a_file(tmp_path: Path) -> None:
    """The class can be rebuilt from its file: every variant works, weights come from the module as it is now."""
    model = zoo.seeded(zoo.TwoInTwoOut)
    with torch.no_grad():
        model.head.bias.fill_(0.25)  # trained in memory: the artifact must carry these weights, not the class's init
    r = kiln.build(model, inputs=zoo.SPECS["TwoInTwoOut"], repo=tmp_path, backends="eager,onnxruntime",
                   precision="fp32", batch=4)
    assert r.name == "twointwoout" and r.batch_sizes == [4]
    assert {c.variant: c.status for c in r.candidates} == {"eager/fp32": "accepted", "onnxruntime/fp32": "accepted"}
    assert r.manifest["source"]["text"] == "zoo.py:TwoInTwoOut" and r.manifest["source"]["weights_sha256"]
    a, b = np.ones((2, 4), np.float32), np.zeros((2, 6), np.float32)
    want = model(torch.from_numpy(a), torch.from_numpy(b))
    for variant in ("eager/fp32", "onnxruntime/fp32"):
        got = kiln.load(r.path, variant=variant)(a=a, b=b)
        assert isinstance(got, dict) and list(got) == ["embedding", "score"]
        np.testing.assert_allclose(got["score"], want["score"].detach().numpy(), rtol=1e-5, atol=1e-6)
    assert model.training is False and model.head.bias[0].item() == 0.25  # the caller's module is not touched


def test_build_an_in_memory_module_that_cannot_be_rebuilt(tmp_path: Path) -> None:
    """A class defined in a notebook cell (here: inside a function): the exported variants carry the graph; the
    ones that carry model code are skipped with the reason and the way out."""

    class Cell(nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.fc = nn.Linear(8, width)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x).relu()

    r = kiln.build(Cell(3), inputs=["x:float32[batch,8]"], repo=tmp_path, backends=["eager", "onnxruntime"],
                   precision="fp32")
    status = {c.variant: c for c in r.candidates}
    assert status["onnxruntime/fp32"].status == "accepted" and r.selected == "onnxruntime/fp32"
    assert status["eager/fp32"].status == "skipped" and "cannot be rebuilt from code" in status["eager/fp32"].reason
    assert any("file.py:make_model" in n for n in r.notes)
    assert kiln.load(r.path)(np.ones((2, 8), np.float32)).shape == (2, 3)


def test_api_errors_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(kiln.KilnError, match="an nn.Module already holds its weights"):
        kiln.build(zoo.MLP(), weights="w.safetensors", inputs=zoo.SPECS["MLP"], repo=tmp_path)
    with pytest.raises(kiln.KilnError, match="not a int"):
        kiln.build(3, repo=tmp_path)  # type: ignore[arg-type]
    with pytest.raises(kiln.KilnError, match="unknown backend 'tvmx'"):
        kiln.build(zoo.MLP(), inputs=zoo.SPECS["MLP"], repo=tmp_path, backends="eager,tvmx")
