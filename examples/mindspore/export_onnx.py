"""A small MindSpore network exported to ONNX for `kiln build`: MindSpore -> ONNX -> kiln's verified variants.

    python examples/mindspore/export_onnx.py OUT_DIR      # with a python that has mindspore (README: MindSpore)
    kiln build OUT_DIR/msnet.onnx

Writes msnet.onnx plus ref_in.npy / ref_out.npy (MindSpore's own output for one input), which
tests/test_runtimes.py compares with the kiln artifact's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mindspore as ms
import numpy as np
from mindspore import nn


class Net(nn.Cell):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Dense(16, 32)
        self.relu = nn.ReLU()
        self.fc2 = nn.Dense(32, 4)

    def construct(self, x: ms.Tensor) -> ms.Tensor:
        return self.fc2(self.relu(self.fc1(x)))


def main(out: Path) -> None:
    ms.set_seed(0)
    net = Net()
    x = ms.Tensor(np.random.default_rng(0).standard_normal((1, 16)).astype(np.float32))
    out.mkdir(parents=True, exist_ok=True)
    ms.onnx.export(net, x, file_name=str(out / "msnet.onnx"), input_names=["x"], output_names=["scores"],
                   dynamic_axes={"x": {0: "batch"}, "scores": {0: "batch"}})
    np.save(out / "ref_in.npy", x.asnumpy())
    np.save(out / "ref_out.npy", net(x).asnumpy())


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "."))
