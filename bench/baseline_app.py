"""The common approach, as a baseline: FastAPI, a TorchScript file, each request run alone under no_grad.

    KILN_BASELINE_MODEL=model.ts.pt uvicorn bench.baseline_app:app --port 8100
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from fastapi import FastAPI, Request, Response
from pydantic import BaseModel

model = torch.jit.load(os.environ["KILN_BASELINE_MODEL"])
model.eval()
app = FastAPI()


class Tensor(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    data: list[float]


class InferRequest(BaseModel):
    inputs: list[Tensor]


def _respond(out: torch.Tensor | tuple[torch.Tensor, ...]) -> dict:
    out = out[0] if isinstance(out, tuple) else out  # kiln's TorchScript artifact returns a tuple of outputs
    return {"model_name": "baseline", "outputs": [{"name": "output", "datatype": "FP32", "shape": list(out.shape),
                                                    "data": out.flatten().tolist()}]}


@app.post("/v2/models/{name}/infer")
def infer(name: str, req: InferRequest) -> dict:
    t = req.inputs[0]
    x = torch.tensor(t.data, dtype=torch.float32).reshape(t.shape)
    with torch.no_grad():
        return _respond(model(x))


@app.post("/v2/models/{name}/infer_lean")
async def infer_lean(name: str, request: Request) -> Response:
    t = (await request.json())["inputs"][0]
    x = torch.from_numpy(np.asarray(t["data"], np.float32).reshape(t["shape"]))
    with torch.no_grad():
        out = model(x)
    return Response(json.dumps(_respond(out)), media_type="application/json")


@app.post("/v2/models/{name}/infer_binary")
async def infer_binary(name: str, request: Request) -> Response:
    body = await request.body()
    n = int(request.headers["inference-header-content-length"])
    head = json.loads(body[:n])
    t = head["inputs"][0]
    x = torch.from_numpy(np.frombuffer(body[n:], np.float32).copy().reshape(t["shape"]))
    with torch.no_grad():
        out = model(x)
    return Response(json.dumps(_respond(out)), media_type="application/json")
