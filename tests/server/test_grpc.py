"""KServe v2 over gRPC: tritonclient.grpc against `kiln serve`'s gRPC port, sharing the HTTP server's data plane."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from kiln.server.app import create_app
from kiln.server.dataplane import DataPlane
from support import DIGITS

from .conftest import ServerThread, free_port

grpcclient = pytest.importorskip("tritonclient.grpc", reason="gRPC needs kiln[grpc] (make test installs it)")
from tritonclient.utils import InferenceServerException  # noqa: E402


@pytest.fixture(scope="module")
def both(serve_repo: Path) -> Iterator[tuple[ServerThread, str]]:
    port = free_port()
    app = create_app(DataPlane(serve_repo, only=["digits", "two"]), grpc_port=port, api_key="s3cret")
    with ServerThread(app) as s:
        yield s, f"127.0.0.1:{port}"


AUTH = {"authorization": "Bearer s3cret"}


def test_tritonclient_grpc_health_metadata_config(both: tuple[ServerThread, str]) -> None:
    _, url = both
    c = grpcclient.InferenceServerClient(url)
    assert c.is_server_live() and c.is_server_ready() and c.is_model_ready("digits")
    assert not c.is_model_ready("nope")
    meta = c.get_model_metadata("two", headers=AUTH, as_json=True)
    assert [t["name"] for t in meta["inputs"]] == ["a", "b"] and meta["inputs"][0]["shape"] == ["-1", "4"]
    config = c.get_model_config("digits", headers=AUTH, as_json=True)["config"]
    assert config["max_batch_size"] == 32 and config["input"][0]["dims"] == ["1", "8", "8"]
    assert c.get_server_metadata(headers=AUTH).name == "kiln"


def test_tritonclient_grpc_infer_matches_http(both: tuple[ServerThread, str]) -> None:
    server, url = both
    x = np.load(DIGITS / "test.npz")["image"][:5]
    c = grpcclient.InferenceServerClient(url)
    inp = grpcclient.InferInput("image", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = c.infer("digits", [inp], headers=AUTH, request_id="r1")
    logits = out.as_numpy("output")
    assert out.get_response().id == "r1" and logits.shape == (5, 10)
    body = {"inputs": [{"name": "image", "datatype": "FP32", "shape": list(x.shape), "data": x.ravel().tolist()}]}
    http = httpx.post(f"{server.url}/v2/models/digits/infer", json=body, headers=AUTH).json()
    np.testing.assert_allclose(logits.ravel(), http["outputs"][0]["data"], rtol=1e-6)
    stats = httpx.get(f"{server.url}/v2/models/digits/stats", headers=AUTH).json()["model_stats"][0]
    assert stats["inference_stats"]["success"]["count"] >= 2  # both protocols counted by one data plane
    g = c.get_inference_statistics("digits", headers=AUTH, as_json=True)["model_stats"][0]  # Triton's extension
    assert int(g["inference_count"]) == stats["inference_count"] and int(g["execution_count"]) == stats["execution_count"]
    assert g["inference_stats"]["compute_infer"]["count"] == str(stats["inference_stats"]["compute_infer"]["count"])
    assert [b["batch_size"] for b in g["batch_stats"]] == [str(b["batch_size"]) for b in stats["batch_stats"]]


def test_grpc_refuses_what_http_refuses(both: tuple[ServerThread, str]) -> None:
    _, url = both
    c = grpcclient.InferenceServerClient(url)
    x = np.zeros((1, 1, 8, 8), np.float32)
    inp = grpcclient.InferInput("image", [1, 1, 8, 8], "FP32")
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException, match="API key") as e:
        c.infer("digits", [inp])
    assert "UNAUTHENTICATED" in str(e.value.status())
    bad = grpcclient.InferInput("image", [1, 8, 8], "FP32")
    bad.set_data_from_numpy(x[0])
    with pytest.raises(InferenceServerException, match="add a batch dimension") as e:
        c.infer("digits", [bad], headers={"authorization": "bearer s3cret"})
    assert "INVALID_ARGUMENT" in str(e.value.status())
    with pytest.raises(InferenceServerException, match="not loaded") as e:
        c.infer("nope", [inp], headers=AUTH)
    assert "NOT_FOUND" in str(e.value.status())
