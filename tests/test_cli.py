"""End to end: the README's commands, run as a user would, in subprocesses."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import kiln
from support import ROOT


def run(*argv: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_readme_quick_start_is_two_commands() -> None:
    readme = (ROOT / "README.md").read_text()
    quick = readme.split("## Quick start", 1)[1].split("```sh", 1)[1].split("```", 1)[0]
    assert [ln.strip() for ln in quick.strip().splitlines()] == ["make demo", "make test"]
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    repo = tmp_path_factory.mktemp("demo")
    return run("make", "--no-print-directory", "demo", f"REPO={repo}"), repo


def test_make_demo(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    p, repo = demo
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout
    for col in ("variant", "agreement", "accuracy", "p50 ms @1", "items/s @32"):
        assert col in out
    for variant in ("eager/fp32", "torchscript/fp32", "aoti/fp32", "onnxruntime/fp32", "compile/fp32"):
        assert re.search(rf"{re.escape(variant)}(\+\S+)?\s.*accepted", out), out  # aoti/compile fold BN: +bnfold
    assert "JSON and binary agree: True" in out and "server stopped" in out
    assert int(re.search(r"(\d+)/8 correct", out)[1]) >= 7  # type: ignore[index]
    # "(latency, 12% ahead of the next)", or "(latency, lossless: ...)" when a faster lossy variant was within the noise
    m = re.search(r"selected (\S+) \(latency(?:, \d+% ahead of the next|, lossless: [^)]*)?\) -> (\S+)", out)
    assert m and Path(m[2]) == repo / "digits" / "1"
    runner = kiln.load(m[2])
    test = np.load(ROOT / "examples" / "digits" / "test.npz")
    assert runner.variant == m[1]
    assert (runner(test["image"]).argmax(1) == test["labels"]).mean() > 0.97


def test_inspect(demo: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, repo = demo
    p = run(sys.executable, "-m", "kiln", "inspect", str(repo / "digits"))
    assert p.returncode == 0, p.stderr
    assert "digits version 1" in p.stdout and "image:float32[batch,1,8,8]" in p.stdout and "sha256" in p.stdout
    assert "curl -s http://localhost:8000/v2/models/digits/infer" in p.stdout and "import tritonclient.http" in p.stdout
    p = run(sys.executable, "-m", "kiln", "inspect", str(repo / "digits" / "1"), "--json")
    assert p.returncode == 0 and '"selected"' in p.stdout
    p = run(sys.executable, "-m", "kiln", "inspect", str(repo / "nothing"))
    assert p.returncode == 2 and "no model at" in p.stderr and "Traceback" not in p.stderr


def test_help_lists_commands_with_examples() -> None:
    p = run(sys.executable, "-m", "kiln", "--help")
    assert p.returncode == 0 and all(c in p.stdout for c in ("build", "inspect", "serve", "bench", "profile"))
    for cmd in ("build", "inspect", "serve", "bench", "profile"):
        p = run(sys.executable, "-m", "kiln", cmd, "--help")
        assert p.returncode == 0 and re.search(r"^examples?:", p.stdout, re.M), cmd


def test_cli_build_options(tmp_path: Path) -> None:
    """--backends, --batch, --objective, --tolerance, --quiet through the real command line."""
    env_bin = Path(sys.executable).parent / "kiln"
    exe = [str(env_bin)] if env_bin.exists() else [sys.executable, "-m", "kiln"]
    p = subprocess.run([*exe, "build", "tests/zoo.py:MLP", "--input", "x:float32[batch,16]", "--repo", str(tmp_path),
                        "--backends", "eager,onnxruntime", "--batch", "1,4", "--objective", "throughput",
                        "--tolerance", "1e-2", "-q"], cwd=ROOT, capture_output=True, text=True, timeout=300,
                       env={**os.environ, "COLUMNS": "200"})
    assert p.returncode == 0, p.stderr
    assert "items/s @4" in p.stdout and "synthetic inputs" in p.stdout
    assert re.search(r"selected \S+ \(throughput(, \d+% ahead of the next|, lossless: [^)]*)?\) -> ", p.stdout), p.stdout
    assert "no --weights given" in p.stdout
    assert p.stderr == ""  # --quiet


@pytest.mark.parametrize(("argv", "message"), [
    (["build", "tests/zoo.py:MLP", "--input", "x:float32[batch,16]", "--batch", "0"], "bad batch sizes"),
    (["build", "tests/zoo.py:MLP", "--input", "x:float32[batch,16]", "--device", "gpu"], "unknown device 'gpu'"),
    (["build", "tests/zoo.py:Nope", "--input", "x:float32[batch,16]"], "has no attribute 'Nope'"),
    (["inspect", "no/such/model"], "no model at"),
])
def test_cli_errors_are_one_message_and_exit_2(argv: list[str], message: str, capsys: pytest.CaptureFixture[str],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from kiln.cli import main

    monkeypatch.chdir(ROOT)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "hint: " in err and "Traceback" not in err


def test_build_in_a_real_terminal_prints_the_table_and_the_result(tmp_path: Path) -> None:
    """Under a pty the progress bar draws, and the variants table, the selected line and the report path must still
    reach the terminal afterwards (a bar that swapped sys.stdout for a proxy once swallowed them)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 140, 0, 0))
    kiln_exe = Path(sys.executable).with_name("kiln")
    p = subprocess.Popen([str(kiln_exe), "build", "tests/zoo.py:MLP", "--input", "x:float32[batch,16]", "--repo",
                          str(tmp_path), "--backends", "eager,onnxruntime", "--precision", "fp32"],
                         cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, close_fds=True,
                         env={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")})
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert p.wait(timeout=300) == 0
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", b"".join(chunks).decode(errors="replace"))
    assert "eager/fp32" in out and "onnxruntime/fp32" in out and "p50 ms @1" in out, out[-3000:]
    assert re.search(r"selected\s+\S+/fp32 \(latency(, \d+% ahead of the next|, lossless: [^)]*)?\) -> ", out), out[-3000:]
    assert "report: " in out and "report.html" in out


def test_bench_cli(demo: tuple[subprocess.CompletedProcess[str], Path], tmp_path: Path) -> None:
    _, repo = demo
    model = repo / "digits"
    p = run(sys.executable, "-m", "kiln", "bench", str(model), "--batch", "1,8", "--min-time-s", "0.1",
            "--html", str(tmp_path / "b.html"), "--csv", str(tmp_path / "b.csv"), "--serving", "--p99-ms", "50", "-q")
    assert p.returncode == 0, p.stderr
    assert "p50 ms @8" in p.stdout and "items/s @8" in p.stdout and "memory MB" in p.stdout
    assert (tmp_path / "b.html").stat().st_size > 5000 and (tmp_path / "b.csv").read_text().startswith("variant,batch")
    assert "serving advice" in p.stderr and "max_batch_size = 8" in (model / "config.toml").read_text()
    p = run(sys.executable, "-m", "kiln", "bench", str(model), "--batch", "2", "--min-time-s", "0.05", "--json", "-", "-q",
            "--variants", "eager/fp32,onnxruntime/fp32")  # the compiled ones were timed above: no second compile
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["batch_sizes"] == [2] and all(v["timings"][0]["p50_ms"] > 0 for v in doc["variants"])
    assert [v["variant"] for v in doc["variants"]] == ["eager/fp32", "onnxruntime/fp32"]
    p = run(sys.executable, "-m", "kiln", "bench", str(model), "--serving")
    assert p.returncode == 2 and "--p99-ms" in p.stderr


def test_init_writes_a_kiln_toml_that_builds(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """kiln init guesses from the model (an Embedding vocabulary is the ids' range, the position table caps seq, a
    mask is 0/1) and the file it writes is what kiln build then reads."""
    import shutil

    from kiln.cli import main

    monkeypatch.chdir(ROOT)
    shutil.copy(ROOT / "tests" / "zoo.py", tmp_path / "zoo.py")
    assert main(["init", f"{tmp_path}/zoo.py:Encoder"]) == 0
    text = (tmp_path / "kiln.toml").read_text()
    assert 'shape = ["batch", "seq<=64"]' in text and "range = [0, 99]" in text and "range = [0, 1]" in text
    assert 'name = "output1"' in text and 'kind = "logits"' in text
    assert main(["init", f"{tmp_path}/zoo.py:Encoder"]) == 2 and "pass --force" in capsys.readouterr().err
    r = kiln.build(f"{tmp_path}/zoo.py:Encoder", repo=tmp_path / "repo", backends="eager", precision="fp32")
    assert [str(s) for s in r.inputs] == ["ids:int64[batch,seq<=64]@0..99", "mask:int64[batch,seq<=64]@0..1"]
    assert r.selected == "eager/fp32"
    # versions: one line per version; --keep prunes the old ones and never the newest
    kiln.build(f"{tmp_path}/zoo.py:Encoder", repo=tmp_path / "repo", backends="eager", precision="fp32")
    capsys.readouterr()
    assert main(["versions", str(tmp_path / "repo" / "encoder")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["version", "created", "selected", "objective", "size", "MB"]
    assert [ln.split()[0] for ln in out[1:]] == ["2", "1"] and "eager/fp32" in out[1]
    assert main(["versions", str(tmp_path / "repo" / "encoder"), "--keep", "1"]) == 0
    assert "removed" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "repo" / "encoder").iterdir()) == ["2"]
    assert main(["versions", str(tmp_path / "repo" / "encoder"), "--keep", "0"]) == 2
