"""Dynamic int8 Linear layers on CUDA at few rows: torchao's quantize_ as a user writes it against kiln's int8-dynamic.

    python3 bench/gpu_int8.py            # one CUDA GPU, torchao installed (carry its wheel to the GPU machine)

cuBLAS's int8 GEMM (torch._int_mm, which torchao's int8 Linear calls on CUDA) refuses 16 rows or fewer and in or out
features that are not multiples of 8. For a small MLP (16 -> 32 -> 5) and a BERT-sized feed-forward block
(768 -> 3072 -> 768), each way runs eager and under torch.compile(dynamic=True) at 1, 7, 16, 17 and 64 rows and prints
"ok" with the cosine against the fp32 module, or the error. kiln keeps the 5-output layer in float and pads fewer
than 17 rows to 17 (kiln.transforms.torch_int8).
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
import zoo  # noqa: E402
from kiln.transforms import Recipe, apply  # noqa: E402
from kiln.transforms.torch_int8 import torchao  # noqa: E402


def by_hand(m: nn.Module) -> nn.Module:
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

    q = copy.deepcopy(m)
    quantize_(q, Int8DynamicActivationInt8WeightConfig())
    return q


def main() -> int:
    torchao()
    torch.manual_seed(0)
    models = {"MLP 16-32-5": (zoo.seeded(zoo.MLP), 16),
              "FFN 768-3072-768": (nn.Sequential(nn.Linear(768, 3072), nn.GELU(), nn.Linear(3072, 768)), 768)}
    ways = {"torchao by hand": by_hand, "kiln int8-dynamic": lambda m: apply(m, Recipe("int8-dynamic"))}
    print(f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    for way, quantize in ways.items():
        for name, (m, k) in models.items():
            m = m.cuda().eval()
            q = quantize(m).cuda()
            torch._dynamo.reset()
            compiled = torch.compile(q, dynamic=True)
            for rows in (1, 7, 16, 17, 64):
                x = torch.randn(rows, k, device="cuda")
                with torch.no_grad():
                    ref = m(x)
                    for how, f in (("eager", q), ("compile", compiled)):
                        try:
                            y = f(x)
                            cos = torch.nn.functional.cosine_similarity(y.flatten(), ref.flatten(), dim=0).item()
                            result = f"ok, cosine {cos:.5f}"
                        except Exception as e:  # the error is the measurement
                            result = f"FAIL {type(e).__name__}: {str(e).splitlines()[0][:110]}"
                        print(f"{way:18} {name:17} {how:8} rows {rows:3}: {result}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
