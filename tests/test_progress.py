import io
from pathlib import Path

import kiln
import zoo
from kiln.progress import Lines, Silent, reporter
from support import ZOO


def test_lines_print_one_line_per_variant_outcome(weights_dir: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    kiln.build(f"{ZOO}:MLP", weights=weights_dir / "MLP.safetensors", inputs=zoo.SPECS["MLP"], repo=tmp_path,
               backends=("eager", "onnxruntime"), precision="fp32", progress=Lines(out))
    lines = out.getvalue().splitlines()
    steps = [ln for ln in lines if ln.strip().startswith("[")]
    assert len(steps) == 2, lines  # eager/fp32 and onnxruntime/fp32, each once
    assert steps[0].strip().startswith("[ 4/8") and "eager/fp32: accepted" in steps[0] and "s left]" in steps[0]
    assert steps[1].strip().startswith("[ 8/8") and "onnxruntime/fp32: accepted" in steps[1]


def test_skipped_variants_still_complete_the_count(tmp_path: Path) -> None:
    out = io.StringIO()
    torch_script = tmp_path / "m.pt"
    import torch

    torch.jit.save(torch.jit.script(zoo.seeded(zoo.MLP)), str(torch_script))
    kiln.build(str(torch_script), inputs=zoo.SPECS["MLP"], repo=tmp_path / "r", backends=("eager", "aoti"),
               progress=Lines(out))
    steps = [ln for ln in out.getvalue().splitlines() if ln.strip().startswith("[")]
    assert steps[-1].strip().startswith("[ 8/8") and "aoti/fp32: skipped" in steps[-1]


def test_reporter_choice() -> None:
    assert isinstance(reporter(quiet=True), Silent)
    assert isinstance(reporter(stream=io.StringIO()), Lines)  # not a terminal: plain lines
