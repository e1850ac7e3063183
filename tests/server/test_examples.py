"""The client examples `kiln inspect` prints run as printed against a real server: curl and tritonclient."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from kiln import repository
from kiln.scaffold import client_examples

from .conftest import ServerThread


@pytest.mark.parametrize("model", ["digits", "two"])
def test_printed_curl_and_tritonclient_examples_run(server: ServerThread, serve_repo: Path, model: str) -> None:
    _, m = repository.resolve(serve_repo / model)
    curl, py = client_examples(m, url=f"127.0.0.1:{server.port}")
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    p = subprocess.run(["bash", "-c", curl], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert [o["name"] for o in doc["outputs"]] == [o["name"] for o in m["outputs"]], doc
    p = subprocess.run([sys.executable, "-c", py], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    for o in m["outputs"]:
        assert f"{o['name']} (1, " in p.stdout, p.stdout


def test_a_large_input_is_written_by_python_not_pasted() -> None:
    m = {"name": "big", "inputs": [{"name": "image", "dtype": "float32", "shape": ["batch", 3, 224, 224]}],
         "outputs": [{"name": "logits", "dtype": "float32", "shape": ["batch", 10]}]}
    curl, py = client_examples(m)
    assert "[0.0] * 150528" in curl and "curl -s http://localhost:8000/v2/models/big/infer" in curl and len(curl) < 500
    assert 'httpclient.InferInput("image", [1, 3, 224, 224], "FP32")' in py
