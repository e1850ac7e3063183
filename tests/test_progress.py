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


def test_estimate_scales_each_variants_prior_cost_by_the_measured_rate() -> None:
    from kiln.plan import Estimate

    est = Estimate([1.0, 25.0, 1.0], fixed_s=2.0)
    assert est.left_s() is None and est.next_s() is None  # nothing measured: no guess
    est.finished(2.0)  # eager took 2 s: 2 s per unit of cost
    assert est.next_s() == 50.0 and est.left_s() == 2.0 * 26 + 2.0
    est.skip()
    assert est.left_s() == 2.0 + 2.0


def test_quick_tries_the_likely_winners_and_a_time_budget_skips_visibly(weights_dir: Path, tmp_path: Path) -> None:
    out = io.StringIO()
    r = kiln.build(f"{ZOO}:MLP", weights=weights_dir / "MLP.safetensors", inputs=zoo.SPECS["MLP"], repo=tmp_path,
                   backends="eager,onnxruntime,aoti,compile", quick=True, time_budget_s=1e-3, progress=Lines(out))
    by = {c.variant: c for c in r.candidates}
    assert r.candidates[0].variant == "eager/fp32" and by["eager/fp32"].status == "accepted"  # the reference runs first
    assert "left out by --quick" in by["aoti/fp32"].reason and "left out by --quick" in by["compile/fp32"].reason
    budget = [c for c in r.candidates if "time budget" in c.reason]
    assert budget and all(c.status == "skipped" for c in budget)
    assert r.selected == "eager/fp32"
    lines = [ln for ln in out.getvalue().splitlines() if ln.strip().startswith("[")]
    assert "s left]" in lines[0] and "time budget" in lines[1]
