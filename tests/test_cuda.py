"""The CUDA paths on a real GPU: bucketed CUDA graphs, pinned side-stream copies, half precision, TensorRT.
Skipped, with the reason, on a machine without one (the CPU-side checks live in test_build and test_plan)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

import kiln
import zoo
from support import ZOO

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_graph_buckets_pad_slice_and_match_eager() -> None:
    from kiln.backends import cuda

    model = zoo.seeded(zoo.MLP).cuda()

    def call(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(xs[0])]

    graphs = cuda.GraphBuckets(call, "cuda", [1, 4, 16])
    for n in (1, 3, 4, 11, 16, 40):
        x = torch.randn(n, 16, device="cuda")
        got = graphs([x])[0]
        with torch.inference_mode():
            torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        assert got.shape[0] == n
    assert sorted(k[0] for k in graphs.graphs) == [1, 4, 16]  # 40 ran without a graph


def test_two_instances_capture_their_graphs_at_the_same_time() -> None:
    """`--instances 2` on one GPU: both instances meet new batch sizes at once and capture concurrently, from two
    threads. Before captures took a per-device lock this failed every time on an H200 ("operation not permitted
    when stream is capturing"; bench/multigpu.py --instances 2 saw "already recording to mempool_id")."""
    import threading

    from kiln.backends import cuda

    model = zoo.seeded(zoo.MLP).cuda()

    def call(xs: list[torch.Tensor]) -> list[torch.Tensor]:
        with torch.inference_mode():
            return [model(xs[0])]

    buckets = [1, 2, 4, 8, 16, 32, 64]
    instances = [cuda.GraphBuckets(call, "cuda", buckets) for _ in range(2)]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    inputs = {n: torch.randn(n, 16, device="cuda") for n in buckets}  # no RNG while another thread captures

    def serve(graphs: cuda.GraphBuckets, sizes: list[int]) -> None:
        start.wait()
        try:
            for n in sizes:
                x = inputs[n]
                got = graphs([x])[0]
                with torch.inference_mode():
                    torch.testing.assert_close(got, model(x), rtol=1e-5, atol=1e-5)
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(g, order)) for g, order in zip(instances, (buckets, buckets[::-1]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(len(g.graphs) == len(buckets) for g in instances)


def test_runner_moves_host_inputs_and_returns_host_outputs() -> None:
    from kiln.backends import cuda

    model = zoo.seeded(zoo.MLP).cuda()
    fn = cuda.wrap(lambda xs: [model(xs[0])], "cuda", graphs=None)
    x = torch.randn(8, 16)
    with torch.inference_mode():
        out = fn([x])[0]
        assert out.device.type == "cpu"
        torch.testing.assert_close(out, model(x.cuda()).cpu())
        assert fn([x.cuda()])[0].device.type == "cuda"  # device in, device out


def test_instances_sharing_a_gpu_each_run_on_a_stream_of_their_own(weights_dir: Path, tmp_path: Path) -> None:
    """`instances = 2` on one GPU: each runner runs on a CUDA stream of its own, so their batches overlap
    (bench/gpu_streams.py), and both answer right when called at once from two threads; one instance keeps the
    thread's stream (it has nothing to overlap with)."""
    import threading

    from kiln import repository
    from kiln.server.config import ModelConfig
    from kiln.server.model import ServedModel

    variant = "eager/fp16+bnfold+channels_last+cudagraphs"
    r = kiln.build(f"{ZOO}:ConvBN", weights=weights_dir / "ConvBN.safetensors", inputs=zoo.SPECS["ConvBN"],
                   repo=tmp_path, device="cuda", batch=(1, 8), variants=["eager/fp32", variant])
    vdir, manifest = repository.resolve(r.path)
    x = np.random.default_rng(0).standard_normal((8, 3, 16, 16)).astype(np.float32)
    ref = kiln.load(r.path, variant="eager/fp32")(x)  # type: ignore[arg-type]
    one = ServedModel("m", vdir, manifest, ModelConfig(devices=["cuda"], variant=variant))
    one.load()
    assert len(one.runners) == 1 and not one._streams
    two = ServedModel("m", vdir, manifest, ModelConfig(devices=["cuda"], variant=variant, instances=2, max_batch_size=8))
    two.load()
    streams = [two._streams[id(runner)] for runner in two.runners]
    assert len({s.stream_id for s in streams}) == 2 and torch.cuda.current_stream().stream_id not in {s.stream_id for s in streams}
    outs: list[np.ndarray] = []
    errors: list[BaseException] = []

    def serve(runner: object) -> None:
        try:
            for _ in range(20):
                outs.append(two._execute(runner, [[x]])[0][0][0])  # type: ignore[arg-type]
        except BaseException as e:  # reported below, in the test's thread
            errors.append(e)

    threads = [threading.Thread(target=serve, args=(runner,)) for runner in two.runners]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(outs) == 40 and all(np.corrcoef(o.ravel(), ref.ravel())[0, 1] > 0.999 for o in outs)


def test_served_batches_are_merged_straight_into_pinned_memory() -> None:
    from kiln.server.model import _merge
    from kiln.spec import TensorSpec

    specs = [TensorSpec.parse("image:float32[batch,3,4]"), TensorSpec.parse("ids:int64[batch]")]
    rng = np.random.default_rng(0)
    payloads = []
    for n in (2, 5):  # read-only views of a body, as binary requests arrive
        image = np.frombuffer(rng.standard_normal((n, 3, 4)).astype(np.float32).tobytes(), np.float32).reshape(n, 3, 4)
        payloads.append([image, np.arange(n, dtype=np.int64)])
    for ps in (payloads, payloads[:1]):
        xs = _merge(ps, specs, pinned=True)
        assert all(x.is_pinned() for x in xs) and [x.dtype for x in xs] == [torch.float32, torch.int64]
        np.testing.assert_array_equal(xs[0].numpy(), np.concatenate([p[0] for p in ps]))
        np.testing.assert_array_equal(xs[1].numpy(), np.concatenate([p[1] for p in ps]))
    assert not any(x.is_pinned() for x in _merge(payloads, specs, pinned=False))

def test_an_engine_gathers_rows_from_page_locked_slots_on_the_gpu() -> None:
    """--worker-devices engine: the engine page-locks the workers' shared-memory slots (tmpfs), and the GPU gathers
    a batch's rows from them: no host copy. Rows from a request body still go through pinned staging."""
    import shutil
    import tempfile

    from kiln.server.engine import Engine, Slots
    from kiln.server.model import _merge
    from kiln.spec import TensorSpec

    folder = Path(tempfile.mkdtemp(dir="/dev/shm" if Path("/dev/shm").is_dir() else None))
    try:
        slots = Slots(folder, "w")
        rng = np.random.default_rng(0)
        engine, views, images = Engine("cuda:0", folder), [], []
        for n in (6, 3):  # two workers' batches, in two slots
            _, name, buf = slots.take(3 << 20)
            image = buf[: 4 * n * 3 * 4].view(np.float32).reshape(n, 3, 4)
            image[...] = rng.standard_normal((n, 3, 4))
            images.append(image.copy())
            views.append((name, engine._map(name)))
        specs = [TensorSpec.parse("image:float32[batch,3,4]")]
        parts = [[m[: len(im) * 48].view(np.float32).reshape(len(im), 3, 4)] for (_, m), im in zip(views, images)]
        assert all(torch.from_numpy(p[0]).is_pinned() for p in parts)
        (x,) = _merge(parts, specs, pinned=True, device="cuda:0")
        assert x.device.type == "cuda" and x.dtype == torch.float32
        np.testing.assert_array_equal(x.cpu().numpy(), np.concatenate(images))
        body = [[np.frombuffer(im.tobytes(), np.float32).reshape(im.shape)] for im in images]  # read-only views
        (y,) = _merge(body, specs, pinned=True, device="cuda:0")
        assert y.device.type == "cpu" and y.is_pinned()
        engine._unmap(dict(views))
        assert not torch.from_numpy(parts[0][0]).is_pinned()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def test_cuda_build_finds_half_precision_and_graph_variants(weights_dir: Path, tmp_path: Path) -> None:
    r = kiln.build(f"{ZOO}:ConvBN", weights=weights_dir / "ConvBN.safetensors", inputs=zoo.SPECS["ConvBN"],
                   repo=tmp_path, device="cuda", batch=(1, 8),
                   variants=["eager/fp32", "eager/fp16*", "eager/bf16*", "compile/fp16+bnfold+channels_last+cudagraphs"])
    status = {c.variant: (c.status, c.reason) for c in r.candidates}
    for v in ("eager/fp32", "eager/fp16+bnfold+channels_last", "eager/fp16+bnfold+channels_last+cudagraphs",
              "eager/bf16+bnfold+channels_last", "compile/fp16+bnfold+channels_last+cudagraphs"):
        assert status[v][0] == "accepted", (v, status[v])
        assert r.candidate(v).peak_gpu_mb is not None
    runner = kiln.load(r.path, device="cuda", variant="eager/fp16+bnfold+channels_last+cudagraphs")  # type: ignore[arg-type]
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    ref = kiln.load(r.path, variant="eager/fp32")(x)  # type: ignore[arg-type]
    out = runner(x)
    assert out.dtype == np.float32 and np.corrcoef(out.ravel(), ref.ravel())[0, 1] > 0.999


def test_tensorrt_engine_round_trip(weights_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("tensorrt", reason="tensorrt is not installed")
    r = kiln.build(f"{ZOO}:ConvBN", weights=weights_dir / "ConvBN.safetensors", inputs=zoo.SPECS["ConvBN"],
                   repo=tmp_path, device="cuda", batch=(1, 8), variants=["eager/fp32", "tensorrt/*"])
    for c in r.candidates:
        if c.backend == "tensorrt":
            assert c.status == "accepted", (c.variant, c.reason)
    again = kiln.build(f"{ZOO}:ConvBN", weights=weights_dir / "ConvBN.safetensors", inputs=zoo.SPECS["ConvBN"],
                       repo=tmp_path, device="cuda", batch=(1, 8), variants=["eager/fp32", "tensorrt/fp16"])
    assert any("reused from the cache" in n for n in again.candidate("tensorrt/fp16").notes)
