"""Two instances of one model on one GPU: do their batches overlap, and what does that give?

    python3 bench/gpu_streams.py                 # BERT-base (64 x 128) and ResNet-50 (256), as kiln builds them
    python3 bench/gpu_streams.py --model bert

Each model is kiln's selected H100 variant's module (BERT: bf16 + epilogue + qkv; ResNet-50: fp16 + bnfold +
channels_last + convfuse), compiled by torch.compile without CUDA graphs and captured into CUDA graphs by hand, one
per instance (its own static buffers and memory pool), as kiln's runners capture them. Rows, items per second
(median of 7 rounds of 2 s each):

    1 instance, back to back      one thread replays, one synchronize per 10 batches (the GPU never waits)
    1 instance, per batch         one thread replays and waits for each batch (a serving instance)
    2 instances, one stream       two threads, each replaying its own graph and waiting for it, both on the
                                  default stream (their kernels serialise: kiln's runners before own streams)
    2 instances, own streams      the same, each instance on a CUDA stream of its own, so one batch's kernels fill
                                  the gaps and tails of the other's

Then kiln's own runner wrapper (kiln.backends.cuda.wrap) around the same module, called on the default stream
and under a stream of its own (as `kiln serve` runs each of several instances on one GPU), timed as kiln's build
times a variant (each call synchronized): p50 ms at batch 1 and items/s at the batch. The table shows each row's ratio to "1 instance, per batch", the GPU it ran on,
and the torch version.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

Model = tuple[Callable[[list[torch.Tensor]], list[torch.Tensor]], int, list[list[torch.Tensor]]]  # call, batch, inputs @1 and @batch
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))


def capture(fn: Callable[[], Any], stream: torch.cuda.Stream) -> torch.cuda.CUDAGraph:
    """fn's kernels as one CUDA graph, captured on `stream` after three warm-up calls there."""
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        fn()
    torch.cuda.synchronize()
    return graph


def rate(worker: Callable[[threading.Event, list[int], int], None], threads: int, batch: int, seconds: float = 2.0) -> float:
    """Items per second over `seconds` with `threads` workers, each counting its batches until told to stop."""
    stop, counts = threading.Event(), [0] * threads
    ts = [threading.Thread(target=worker, args=(stop, counts, i)) for i in range(threads)]
    t0 = time.perf_counter()
    for t in ts:
        t.start()
    time.sleep(seconds)
    stop.set()
    for t in ts:
        t.join()
    torch.cuda.synchronize()
    return sum(counts) * batch / (time.perf_counter() - t0)


def measure(name: str, make: Callable[[], Model]) -> list[tuple[str, float]]:
    """The four rows for one model, then kiln_rows. `make` returns a fresh instance: its call, batch and inputs."""
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    models = [make(), make()]
    batch = models[0][1]
    graphs = [capture(functools.partial(m[0], m[2][1]), streams[i]) for i, m in enumerate(models)]
    default = torch.cuda.default_stream()

    def back_to_back(stop: threading.Event, counts: list[int], i: int) -> None:
        while not stop.is_set():
            for _ in range(10):
                graphs[i].replay()
            torch.cuda.current_stream().synchronize()
            counts[i] += 10

    def per_batch(own: bool) -> Callable[[threading.Event, list[int], int], None]:
        def work(stop: threading.Event, counts: list[int], i: int) -> None:
            stream = streams[i] if own else default
            with torch.cuda.stream(stream):
                while not stop.is_set():
                    graphs[i].replay()
                    stream.synchronize()
                    counts[i] += 1
        return work

    cases: list[tuple[str, Any, int]] = [("1 instance, back to back", back_to_back, 1),
                                         ("1 instance, per batch", per_batch(True), 1),
                                         ("2 instances, one stream", per_batch(False), 2),
                                         ("2 instances, own streams", per_batch(True), 2)]
    results: dict[str, list[float]] = {label: [] for label, _, _ in cases}
    for _ in range(7):  # interleaved rounds, so a slow spell of the machine does not land on one row
        for label, work, threads in cases:
            results[label].append(rate(work, threads, batch))
    rows = [(f"{name}: {label}", statistics.median(v)) for label, v in results.items()]
    for r in rows:
        print(f"  {r[0]}: {r[1]:,.0f}", file=sys.stderr, flush=True)
    return rows + kiln_rows(name, models[0])


def kiln_rows(name: str, model: Model) -> list[tuple[str, float]]:
    """kiln's runner wrapper (kiln.backends.cuda.wrap, CUDA graphs for batch 1 and the batch) around the same
    module, called on the default stream and under a stream of its own (as `kiln serve` runs each of several
    instances on a GPU), timed as kiln's build times a variant: p50 of calls synchronized one by one, at batch 1
    (ms) and at the batch (items/s), in interleaved rounds."""
    from kiln.backends import cuda

    call, batch, inputs = model
    rows: dict[str, list[float]] = {}
    fns = {own: cuda.wrap(call, "cuda", graphs=[1, batch]) for own in (False, True)}
    streams = {False: None, True: torch.cuda.Stream()}
    for _ in range(5):
        for own, fn in fns.items():
            with torch.cuda.stream(streams[own]):
                for xs, n in ((inputs[0], 1), (inputs[1], batch)):
                    for _ in range(5):
                        fn(xs)
                    torch.cuda.synchronize()
                    samples = []
                    for _ in range(100):
                        t0 = time.perf_counter()
                        fn(xs)
                        torch.cuda.synchronize()
                        samples.append(time.perf_counter() - t0)
                    p50 = statistics.median(samples)
                    key = f"{name}: kiln runner, {'own stream' if own else 'default stream'}, " + (
                        "p50 ms @1" if n == 1 else f"per call @{batch}")
                    rows.setdefault(key, []).append(p50 * 1e3 if n == 1 else n / p50)
    out = [(k, statistics.median(v)) for k, v in rows.items()]
    for r in out:
        print(f"  {r[0]}: {r[1]:,.3f}", file=sys.stderr, flush=True)
    return out


def bert() -> Model:
    from transformers import BertConfig, BertModel

    from kiln.transforms import replace_layers
    from kiln.transforms.epilogue import LinearGELU, is_gelu_ffn
    from kiln.transforms.qkv import FusedQKVAttention, is_fusable_attention

    torch.manual_seed(0)
    m = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False).eval().cuda().bfloat16()
    replace_layers(m, is_fusable_attention, FusedQKVAttention)
    replace_layers(m, is_gelu_ffn, lambda layer: LinearGELU(layer.dense))
    f = torch.compile(m)
    ids = torch.randint(0, 30522, (64, 128), device="cuda")
    mask = torch.ones(64, 128, dtype=torch.int64, device="cuda")
    return (lambda xs: [f(input_ids=xs[0], attention_mask=xs[1]).last_hidden_state]), 64, [[ids[:1], mask[:1]], [ids, mask]]


def resnet() -> Model:
    from gpu_models import resnet50

    from kiln.recipe import Recipe
    from kiln.transforms import apply, convfuse

    torch.manual_seed(0)
    model = apply(resnet50().eval(), Recipe.parse("fp16+bnfold+channels_last")).cuda().eval()
    model.inner, _ = convfuse.fuse(model.inner, channels_last=True)
    f = torch.compile(model)
    x = torch.randn(256, 3, 224, 224, device="cuda")
    return (lambda xs: [f(xs[0])]), 256, [[x[:1]], [x]]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="bert,resnet", help="bert, resnet, or both (comma-separated)")
    args = p.parse_args()
    torch.backends.cudnn.benchmark = True
    rows: list[tuple[str, float]] = []
    with torch.inference_mode():
        for name in args.model.split(","):
            rows += measure(name, {"bert": bert, "resnet": resnet}[name])
    print(f"\nTwo instances on one GPU, {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    print(f"{'case':50} {'items/s':>9} {'vs per batch':>13}")
    for label, r in rows:
        if "p50 ms" in label:
            print(f"{label:50} {r:>9.3f} ms")
            continue
        base = next(v for k, v in rows if k == label.split(":")[0] + ": 1 instance, per batch")
        print(f"{label:50} {r:>9,.0f} {r / base:>12.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
