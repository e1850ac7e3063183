"""Triton python-backend model for bench/serve.py: the TorchScript file in $KILN_PEER_MODEL, batched as Triton hands it."""

import os

import numpy as np
import torch
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        torch.set_num_threads(int(os.environ.get("KILN_PEER_THREADS", "2")))
        self.model = torch.jit.load(os.environ["KILN_PEER_MODEL"]).eval()

    def execute(self, requests):
        xs = [pb_utils.get_input_tensor_by_name(r, "image").as_numpy() for r in requests]
        sizes = [len(x) for x in xs]
        with torch.inference_mode():
            out = self.model(torch.from_numpy(np.concatenate(xs)))
        out = (out[0] if isinstance(out, (tuple, list)) else out).numpy()  # kiln's TorchScript returns a tuple
        res, start = [], 0
        for n in sizes:
            res.append(pb_utils.InferenceResponse([pb_utils.Tensor("output", out[start:start + n])]))
            start += n
        return res
