"""Every way a model source can be wrong gets a precise KilnError (and, from the CLI, exit 2 and no traceback)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file, save_model

import kiln
import zoo
from kiln.errors import KilnError
from kiln.source import ModelSource, load_module
from support import ZOO


def _load(text: str, weights: Path | str | None = None) -> torch.nn.Module:
    return load_module(ModelSource.parse(text, weights=weights))


def test_python_file_and_module_sources(weights_dir: Path) -> None:
    m = _load(f"{ZOO}:MLP", weights_dir / "MLP.safetensors")
    assert not m.training and torch.equal(m.net[0].weight, zoo.seeded(zoo.MLP).net[0].weight)
    assert isinstance(_load("zoo:ConvBN", weights_dir / "ConvBN.safetensors"), zoo.ConvBN)


def test_pth_state_dict_and_checkpoint(tmp_path: Path) -> None:
    ref = zoo.seeded(zoo.MLP)
    torch.save(ref.state_dict(), tmp_path / "w.pth")
    torch.save({"state_dict": ref.state_dict(), "epoch": 3}, tmp_path / "ckpt.pt")
    for f in ("w.pth", "ckpt.pt"):
        assert torch.equal(_load(f"{ZOO}:MLP", tmp_path / f).net[2].bias, ref.net[2].bias)


def error_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    """name -> (CLI arguments after `kiln build`, text the message must contain)."""
    save_model(zoo.seeded(zoo.ConvBN), str(tmp / "convbn.safetensors"))
    sd = zoo.seeded(zoo.MLP).state_dict()
    sd["net.0.weight"] = torch.zeros(7, 16)
    sd["extra.weight"] = torch.zeros(1)
    del sd["net.2.bias"]
    save_file(sd, str(tmp / "misfit.safetensors"))
    torch.save(zoo.seeded(zoo.MLP), tmp / "whole_module.pth")
    torch.save(zoo.seeded(zoo.MLP).state_dict(), tmp / "state_dict.pt")
    (tmp / "model.h5").write_bytes(b"\x89HDF")
    (tmp / "corrupt.safetensors").write_bytes(b"not really")
    return {
        "missing file": ([str(tmp / "nope.py") + ":Net"], "model file not found"),
        "missing weights": ([f"{ZOO}:MLP", "--weights", str(tmp / "nope.safetensors")], "weights file not found"),
        "missing attribute": ([f"{ZOO}:NoSuchNet"], "has no attribute 'NoSuchNet'"),
        "missing module": (["no_such_pkg.models:Net"], "cannot import module 'no_such_pkg.models'"),
        "weights do not fit": ([f"{ZOO}:MLP", "--weights", str(tmp / "convbn.safetensors")], "missing keys"),
        "mis-shaped weights": ([f"{ZOO}:MLP", "--weights", str(tmp / "misfit.safetensors")],
                               "net.0.weight: file (7, 16) vs model (32, 16)"),
        "pickled module": ([f"{ZOO}:MLP", "--weights", str(tmp / "whole_module.pth")], "refuses to unpickle"),
        "pickled module as source": ([str(tmp / "whole_module.pth")], "pickled nn.Module"),
        "state_dict as source": ([str(tmp / "state_dict.pt")], "is a state_dict, not a model"),
        "unknown extension": ([str(tmp / "model.h5")], "unknown model file type '.h5'"),
        "corrupt weights": ([f"{ZOO}:MLP", "--weights", str(tmp / "corrupt.safetensors")], "cannot read safetensors"),
        "factory raises": ([f"{ZOO}:raising_factory"], "raised ValueError: this factory needs a config file"),
        "not a module": ([f"{ZOO}:not_a_module"], "not a torch.nn.Module"),
    }


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], str]]:
    return error_cases(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", ["missing file", "missing weights", "missing attribute", "missing module",
                                  "weights do not fit", "mis-shaped weights", "pickled module", "pickled module as source",
                                  "state_dict as source", "unknown extension", "corrupt weights", "factory raises", "not a module"])
def test_source_errors(cases: dict[str, tuple[list[str], str]], case: str) -> None:
    argv, needle = cases[case]
    weights = argv[argv.index("--weights") + 1] if "--weights" in argv else None
    with pytest.raises(KilnError) as e:
        _load(argv[0], weights)
    assert needle in str(e.value) and e.value.hint


def test_misfit_lists_all_problems(cases: dict[str, tuple[list[str], str]]) -> None:
    argv, _ = cases["mis-shaped weights"]
    with pytest.raises(KilnError) as e:
        _load(argv[0], argv[2])
    msg = str(e.value)
    assert "missing keys (1): net.2.bias" in msg and "unexpected keys (1): extra.weight" in msg and "shape mismatches (1)" in msg


def test_cli_errors_exit_2_without_traceback(cases: dict[str, tuple[list[str], str]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Exit code 2, the message and a hint, never a traceback: the first case through the real command in a
    subprocess, the rest through the same entry point in-process (a subprocess each buys nothing more)."""
    from kiln.cli import main

    for i, (name, (argv, needle)) in enumerate(cases.items()):
        spec = [] if "--input" in argv else ["--input", "x:float32[batch,16]"]
        full = ["build", *argv, *spec, "--repo", str(tmp_path)]
        if i == 0:
            p = subprocess.run([sys.executable, "-m", "kiln", *full], capture_output=True, text=True, timeout=120)
            code, err = p.returncode, p.stderr + p.stdout
        else:
            code = main(full)
            captured = capsys.readouterr()
            err = captured.err + captured.out
        assert code == 2, (name, err)
        assert needle in err and "hint:" in err, (name, err)
        assert "Traceback" not in err, (name, err)


def test_a_ddp_checkpoint_loads_with_its_prefix_stripped_and_a_note(tmp_path: Path) -> None:
    m = zoo.seeded(zoo.MLP)
    torch.save({f"module.{k}": v for k, v in m.state_dict().items()}, tmp_path / "ddp.pth")
    src = ModelSource.parse(f"{ZOO}:MLP", weights=tmp_path / "ddp.pth")
    loaded = load_module(src)
    x = torch.randn(2, 16)
    torch.testing.assert_close(loaded(x), m.eval()(x))
    assert any("stripped the 'module.' prefix" in n for n in src.notes)


def test_another_prefix_is_named_in_the_hint(tmp_path: Path) -> None:
    m = zoo.seeded(zoo.MLP)
    torch.save({f"net.{k}": v for k, v in m.state_dict().items()}, tmp_path / "wrapped.pth")
    with pytest.raises(KilnError) as e:
        load_module(ModelSource.parse(f"{ZOO}:MLP", weights=tmp_path / "wrapped.pth"))
    assert "starts with 'net.': strip the prefix" in (e.value.hint or "")


def test_a_checkpoint_without_a_state_dict_shows_its_keys(tmp_path: Path) -> None:
    m = zoo.seeded(zoo.MLP)
    torch.save({"epoch": 3, "net": m.state_dict(), "best": 0.9}, tmp_path / "ckpt.pth")
    with pytest.raises(KilnError, match="top-level keys are: best, epoch, net") as e:
        load_module(ModelSource.parse(f"{ZOO}:MLP", weights=tmp_path / "ckpt.pth"))
    assert "under 'net'" in (e.value.hint or "")


def test_kiln_toml_typos_name_the_key(tmp_path: Path) -> None:
    from kiln.spec import load_toml_specs

    (tmp_path / "kiln.toml").write_text('name = "m"\n[[inputs]]\nname = "x"\ndtyp = "float32"\nshape = ["batch", 4]\n')
    with pytest.raises(KilnError, match="unknown key 'dtyp' \\(did you mean 'dtype'\\?\\)"):
        load_toml_specs(tmp_path / "kiln.toml")
    (tmp_path / "kiln.toml").write_text('nme = "m"\n')
    with pytest.raises(KilnError, match="unknown key 'nme' \\(did you mean 'name'\\?\\)"):
        load_toml_specs(tmp_path / "kiln.toml")


def test_missing_inputs_name_forward_arguments(tmp_path: Path) -> None:
    with pytest.raises(KilnError, match="forward\\(\\) takes a, b") as e:
        kiln.build(f"{ZOO}:TwoInTwoOut", repo=tmp_path, backends=("eager",))
    assert "--input 'a:float32[batch,...]' --input 'b:float32[batch,...]'" in (e.value.hint or "")


def test_channels_last_data_gets_the_transpose(tmp_path: Path) -> None:
    from kiln.runner import check_tensor
    from kiln.spec import TensorSpec

    spec = TensorSpec.parse("image:float32[batch,3,32,32]")
    with pytest.raises(KilnError) as e:
        check_tensor(spec, np.zeros((2, 32, 32, 3), np.float32), {})
    assert "numpy.transpose(x, (0, 3, 1, 2))" in (e.value.hint or "")
