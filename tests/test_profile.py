import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import kiln
from kiln.profile import profile


def test_torch_profile_and_trace(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    r = profile(built("ConvBN").path, variant="eager/fp32", batch=4, steps=5, trace=tmp_path / "t.json", memory=True)
    assert r.profiler == "torch.profiler" and r.ops and r.ops[0].self_ms >= r.ops[-1].self_ms
    assert any("conv" in o.name for o in r.ops[:5])
    trace = json.loads((tmp_path / "t.json").read_text())
    assert any(e.get("name", "").startswith("aten::") and e.get("ph") == "X" for e in trace["traceEvents"])
    assert r.memory and "peak growth" in r.memory


def test_onnxruntime_profile_and_trace(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    r = profile(built("ConvBN").path, variant="onnxruntime/fp32", batch=2, steps=7, trace=tmp_path / "o.json")
    assert r.profiler == "onnxruntime profiler"
    names = {o.name for o in r.ops}
    assert "Conv" in names and all(o.calls == 7 for o in r.ops if o.name == "Conv")
    events = json.loads((tmp_path / "o.json").read_text())
    assert isinstance(events, list) and any(e.get("cat") == "Node" and e.get("ph") == "X" for e in events)


def test_profile_cli(built: Callable[[str], kiln.BuildResult], tmp_path: Path) -> None:
    p = subprocess.run([sys.executable, "-m", "kiln", "profile", str(built("MLP").path), "--batch", "8", "--steps", "5",
                        "--trace", str(tmp_path / "cli.json")], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "top operators by self time" in p.stdout and (tmp_path / "cli.json").is_file()
