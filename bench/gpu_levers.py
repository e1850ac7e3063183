"""GPU levers for BERT-base, measured before they are built into kiln (batch 64, sequence 128, random weights).

    python3 bench/gpu_levers.py --lever mask     # dropping the all-ones attention mask (SDPA's flash kernel)
    python3 bench/gpu_levers.py --lever fp8      # torchao float8 Linear layers (H100/H200; carry a torchao wheel)
    python3 bench/gpu_levers.py --lever packed   # padding-free BERT: one fused QKV GEMM, varlen flash attention
    python3 bench/gpu_levers.py --lever autotune # max-autotune for the GEMMs only, cached (first and second compile)
    python3 bench/gpu_levers.py --lever profile  # where the bf16 variant's time goes, kernel by kernel
    python3 bench/gpu_levers.py --lever dynamic  # the same compile with dynamic shapes, as kiln's variant is built
    python3 bench/gpu_levers.py --lever gelu     # the FFN's GELU in the GEMM's epilogue (cuBLASLt, tanh GELU)
    python3 bench/gpu_levers.py --lever qkv      # on top of gelu: Q, K and V as one GEMM (kiln's qkv pass), against
                                                 # Inductor's freezing (alone and with its batch_linear_lhs fusion)
    python3 bench/gpu_levers.py --lever sdpa     # SDPA alone at BERT's shape, by backend and mask form; then kiln's
                                                 # qkv + epilogue model with its mask, without it, and cuDNN first
    python3 bench/gpu_levers.py --lever keymask  # kiln's qkv + epilogue model with the encoder's [B,1,S,S] mask cut to
                                                 # its first query row [B,1,1,S] (a padding mask's rows are all alike)

Each row is BERT-base in bf16 under torch.compile(mode="reduce-overhead"), as kiln's compile/bf16+cudagraphs
variant runs it: seq/s (median of 20 timed rounds of 10 calls), the attention kernels the profiler saw (mask
lever), and the row cosine of the last hidden state against the fp32 eager model (worst token).

The packed lever runs BERT's layers on the [tokens, hidden] matrix of real tokens only (no padding rows), with
Q, K and V as one GEMM and `torch.nn.attention.varlen.varlen_attn` (flash) per sequence. It is timed on the
target's batch (64 x 128, every token real) and on a realistic batch: 64 sentences with lengths drawn from a
log-normal (median 40 tokens, clipped to 8..128), against the padded model (mask, 128 columns) and the padded
model cut to the batch's longest sentence (what kiln's +trim does).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import itertools
import math
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from kiln.profile import kernel_kind
from kiln.transforms import replace_layers
from kiln.transforms.qkv import FusedQKVAttention, is_fusable_attention


def timed(f: Callable[[], Any]) -> float:
    """Seconds per call: median of 20 rounds of 10 calls, after 5 warm-up calls."""
    for _ in range(5):
        f()
    torch.cuda.synchronize()
    per = []
    for _ in range(20):
        t0 = time.perf_counter()
        for _ in range(10):
            f()
        torch.cuda.synchronize()
        per.append((time.perf_counter() - t0) / 10)
    return statistics.median(per)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().flatten(0, 1), b.float().flatten(0, 1)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lever", default="all", help="all, or a comma-separated subset of mask,fp8,packed,autotune,profile,"
                                                   "gelu,dynamic,qkv,sdpa,keymask,kiln")
    p.add_argument("--skip-reference", action="store_true",
                   help="leave out the plain bf16 row (the table's first row is then the reference)")
    p.add_argument("--kiln-all", action="store_true",
                   help="--lever kiln: build every BERT variant bench/gpu.py builds first, as it does, then load one")
    args = p.parse_args()
    levers = {"mask", "fp8", "packed", "autotune", "profile", "gelu", "dynamic", "qkv", "sdpa", "keymask", "kiln"} if args.lever == "all" else set(args.lever.split(","))
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    fp32 = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False).eval().cuda()
    ids = torch.randint(0, 30522, (64, 128), device="cuda")
    ones = torch.ones(64, 128, dtype=torch.int64, device="cuda")
    with torch.inference_mode():
        ref = fp32(input_ids=ids, attention_mask=ones).last_hidden_state
    bf16 = copy.deepcopy(fp32).bfloat16()
    rows: list[tuple[str, float, float, str]] = []

    def run(label: str, model: torch.nn.Module, mask: torch.Tensor | None, dynamic: bool | None = None,
            inductor: dict[str, Any] | None = None, context: Any = None) -> None:
        torch._dynamo.reset()
        f = torch.compile(model, mode="reduce-overhead", dynamic=dynamic)
        with torch.inference_mode(), torch._inductor.config.patch(inductor or {}), context or contextlib.nullcontext():
            call = lambda: f(input_ids=ids, attention_mask=mask).last_hidden_state  # noqa: E731
            out = call().clone()
            s = timed(call)
            total, top = kernel_us(call)
            print(f"  {label}: {total:,.0f} us of kernels per batch, {len(top)} distinct; top: "
                  + "; ".join(f"{k} {us:,.0f}us" for us, k in top[:4]), file=sys.stderr, flush=True)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                call()
                torch.cuda.synchronize()
        kernels = sorted({e.key[:50] for e in prof.key_averages()
                          if any(k in e.key.lower() for k in ("attention", "fmha", "flash"))})
        rows.append((label, 64 / s, cosine(out, ref), ", ".join(kernels) or "-"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    if not args.skip_reference:
        run("bf16, all-ones mask", bf16, ones)
    if "mask" in levers:
        run("bf16, mask dropped (None)", bf16, None)
    if "fp8" in levers:
        try:
            from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow, PerTensor, quantize_
        except ImportError as e:
            print(f"fp8: torchao is not installed here ({e})", file=sys.stderr)
        else:
            for name, gran in (("per-row", PerRow()), ("per-tensor", PerTensor())):
                m = copy.deepcopy(bf16)
                quantize_(m, Float8DynamicActivationFloat8WeightConfig(granularity=gran))
                run(f"fp8 {name} (torchao), all-ones mask", m, ones)
    if "dynamic" in levers:  # kiln compiles once for every batch size and sequence length
        run("bf16, dynamic shapes", bf16, ones, dynamic=True)
    if "gelu" in levers:
        m = copy.deepcopy(bf16)
        for layer in m.encoder.layer:
            layer.intermediate.forward = functools.partial(_linear_gelu_of, layer.intermediate.dense)
        run("bf16, GELU in the GEMM epilogue", m, ones)
    if "qkv" in levers:
        m = copy.deepcopy(bf16)
        for layer in m.encoder.layer:
            layer.intermediate.forward = functools.partial(_linear_gelu_of, layer.intermediate.dense)
        run("bf16, GELU epilogue (qkv reference)", m, ones)
        run("bf16, GELU epilogue, freezing", m, ones, inductor={"freezing": True})
        run("bf16, GELU epilogue, freezing + batch_linear_lhs", m, ones,
            inductor={"freezing": True, "pre_grad_fusion_options": {"batch_linear_lhs": {}}})
        replace_layers(m, is_fusable_attention, FusedQKVAttention)  # kiln's qkv pass, as the build applies it
        run("bf16, GELU epilogue + fused QKV GEMM", m, ones)
    if "sdpa" in levers:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        sdpa_table()
        m = copy.deepcopy(bf16)
        for layer in m.encoder.layer:
            layer.intermediate.forward = functools.partial(_linear_gelu_of, layer.intermediate.dense)
        replace_layers(m, is_fusable_attention, FusedQKVAttention)
        run("qkv + epilogue, all-ones mask (kiln)", m, ones)
        run("qkv + epilogue, mask None", m, None)
        first = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        run("qkv + epilogue, mask None, cuDNN first", m, None, context=sdpa_kernel(first, set_priority=True))
        run("qkv + epilogue, all-ones mask, cuDNN first", m, ones, context=sdpa_kernel(first, set_priority=True))
    if "keymask" in levers:  # SDPA alone with each mask form: bench/gpu_attention.py
        for label, cls in (("qkv + epilogue, the encoder's mask (kiln)", FusedQKVAttention),
                           ("qkv + epilogue, mask cut to [B,1,1,S], boolean", KeyMaskAttention),
                           ("qkv + epilogue, mask cut to [B,1,1,S], additive", AdditiveKeyMaskAttention)):
            m = copy.deepcopy(bf16)
            for layer in m.encoder.layer:
                layer.intermediate.forward = functools.partial(_linear_gelu_of, layer.intermediate.dense)
            replace_layers(m, is_fusable_attention, cls)
            run(label, m, ones)
    if "packed" in levers:
        rows += packed_rows(fp32, bf16, ids, ref)
    if "autotune" in levers:
        rows += autotune_rows(bf16, ids, ones, ref)
    if "profile" in levers:
        profile_table(bf16, ids, ones)
    if "kiln" in levers:
        rows += kiln_rows(ids, ones, ref, everything=args.kiln_all)
    print(f"\nBERT-base, batch 64, seq 128, torch.compile reduce-overhead, {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    if not rows:  # --skip-reference with levers that print their own tables (sdpa, profile)
        return 0
    base = rows[0][1]
    print(f"{'variant':40} {'seq/s':>9} {'vs first':>8} {'cosine':>9}  attention kernels")
    for label, rate, cos, kernels in rows:
        print(f"{label:40} {rate:>9,.0f} {rate / base:>7.2f}x {cos:>9.5f}  {kernels}")
    return 0


@torch.library.custom_op("kilnbench::linear_gelu", mutates_args=())
def linear_gelu(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """GELU(x @ w.T + b) as one cuBLASLt call (its GELU epilogue is the tanh approximation). A custom op, so that
    inductor keeps it whole instead of splitting off the GELU into a kernel of its own."""
    y = torch._addmm_activation(b, x.reshape(-1, x.shape[-1]), w.t(), use_gelu=True)
    return y.view(*x.shape[:-1], w.shape[0])


@linear_gelu.register_fake
def _(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], w.shape[0])


def _linear_gelu_of(dense: torch.nn.Linear, hidden_states: torch.Tensor) -> torch.Tensor:
    return linear_gelu(hidden_states, dense.weight, dense.bias)


class PackedBert(torch.nn.Module):
    """BERT-base's encoder over real tokens only: x is [tokens, hidden], sequences delimited by `cu` (cumulative
    lengths, int32, N+1). Q, K and V are one GEMM (their weights concatenated); attention is varlen flash."""

    def __init__(self, bert: Any) -> None:
        super().__init__()
        self.emb = bert.embeddings
        self.layers = torch.nn.ModuleList()
        for layer in bert.encoder.layer:
            a = layer.attention.self
            qkv = FusedQKVAttention(a).qkv  # kiln's qkv pass: the three weights concatenated
            self.layers.append(torch.nn.ModuleDict({"qkv": qkv, "attn_out": layer.attention.output.dense,
                                                    "ln1": layer.attention.output.LayerNorm,
                                                    "up": layer.intermediate.dense, "down": layer.output.dense,
                                                    "ln2": layer.output.LayerNorm}))
        self.heads = bert.config.num_attention_heads

    def forward(self, ids: torch.Tensor, pos: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
        from torch.nn.attention.varlen import varlen_attn

        e = self.emb
        x = e.word_embeddings(ids) + e.position_embeddings(pos) + e.token_type_embeddings.weight[0]
        x = e.LayerNorm(x)
        t, hidden = x.shape
        for m in self.layers:
            q, k, v = m["qkv"](x).view(t, 3, self.heads, hidden // self.heads).unbind(1)
            o = varlen_attn(q, k, v, cu, cu, max_len, max_len).reshape(t, hidden)
            x = m["ln1"](m["attn_out"](o) + x)
            x = m["ln2"](m["down"](torch.nn.functional.gelu(m["up"](x))) + x)
        return x


def packed_inputs(lengths: list[int], device: str = "cuda") -> tuple[torch.Tensor, torch.Tensor, int]:
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
    pos = torch.cat([torch.arange(n, device=device) for n in lengths])
    return cu, pos, max(lengths)


def packed_rows(fp32: Any, bf16: Any, ids: torch.Tensor, ref: torch.Tensor) -> list[tuple[str, float, float, str]]:
    """The target batch (every token real) and a realistic one, padded vs trimmed vs packed."""
    rows = []
    model = PackedBert(copy.deepcopy(bf16)).eval()
    torch._dynamo.reset()
    f: Any = torch.compile(model, mode="reduce-overhead")
    cu, pos, top = packed_inputs([128] * 64)
    flat = ids.flatten()
    how = "varlen flash, compiled"
    with torch.inference_mode():
        try:
            out = f(flat, pos, cu, top).clone().view(64, 128, -1)
        except Exception as e:  # measured eager then, and said so
            print(f"packed: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); timing it eager", file=sys.stderr)
            f, how = model, "varlen flash, eager (compile failed)"
            out = f(flat, pos, cu, top).clone().view(64, 128, -1)
        call = lambda: f(flat, pos, cu, top)  # noqa: E731
        s = timed(call)
    rows.append(("packed+fused QKV, 64 x 128 (all real)", 64 / s, cosine(out, ref), how))
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)

    gen = torch.Generator().manual_seed(1)
    lengths = [int(min(128, max(8, round(float(torch.empty(1).log_normal_(math.log(40), 0.5, generator=gen)))))) for _ in range(64)]
    longest = max(lengths)
    mask = torch.zeros(64, 128, dtype=torch.int64, device="cuda")
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
    with torch.inference_mode():
        real_ref = fp32(input_ids=ids, attention_mask=mask).last_hidden_state
    note = f"lengths median {statistics.median(lengths):.0f}, max {longest}, {sum(lengths)} of {64 * 128} tokens real"

    def real_cosine(out_rows: list[torch.Tensor]) -> float:
        return min(cosine(o[None, :n], real_ref[i:i + 1, :n]) for i, (o, n) in enumerate(zip(out_rows, lengths)))

    for label, width in (("padded to 128 (mask), realistic lengths", 128), ("trimmed to the longest, realistic lengths", longest)):
        torch._dynamo.reset()
        g = torch.compile(bf16, mode="reduce-overhead")
        i2, m2 = ids[:, :width].contiguous(), mask[:, :width].contiguous()
        with torch.inference_mode():
            call = lambda g=g, i2=i2, m2=m2: g(input_ids=i2, attention_mask=m2).last_hidden_state  # noqa: E731
            out = call().clone()
            s = timed(call)
        rows.append((label, 64 / s, real_cosine(list(out)), note))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    cu, pos, top = packed_inputs(lengths)
    flat = torch.cat([ids[i, :n] for i, n in enumerate(lengths)])
    torch._dynamo.reset()
    if how.endswith("compiled"):
        f = torch.compile(model, mode="reduce-overhead")
    with torch.inference_mode():
        call = lambda: f(flat, pos, cu, top)  # noqa: E731
        out = call().clone()
        s = timed(call)
    pieces = list(out.split(lengths))
    rows.append(("packed+fused QKV, realistic lengths", 64 / s, real_cosine(pieces), f"{note}; {how}"))
    print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def autotune_rows(bf16: Any, ids: torch.Tensor, ones: torch.Tensor, ref: torch.Tensor) -> list[tuple[str, float, float, str]]:
    """max-autotune for the GEMMs only (not pointwise or reductions), CUDA graphs on; the second compile of the same
    model reads the autotuning results and the FX graph from the cache (TORCHINDUCTOR_CACHE_DIR)."""
    rows = []
    options: dict[str, Any] = {"max_autotune_gemm": True, "max_autotune_pointwise": False, "triton.cudagraphs": True,
               "max_autotune_gemm_backends": "ATEN,TRITON"}
    for attempt in ("first compile", "second compile (cached)"):
        torch._dynamo.reset()
        g = torch.compile(bf16, options=options)
        with torch.inference_mode():
            call = lambda g=g: g(input_ids=ids, attention_mask=ones).last_hidden_state  # noqa: E731
            t0 = time.perf_counter()
            out = call().clone()
            torch.cuda.synchronize()
            compile_s = time.perf_counter() - t0
            s = timed(call)
        rows.append((f"max-autotune GEMMs only, {attempt}", 64 / s, cosine(out, ref), f"compile {compile_s:.0f} s"))
        print(f"  {rows[-1]}", file=sys.stderr, flush=True)
    return rows


def us_per_call(call: Callable[[], Any], *, calls: int = 200, rounds: int = 5) -> float:
    """Microseconds per call of a GPU op: the median of `rounds` rounds of `calls` calls, timed with CUDA events
    (after 10 warm-up calls)."""
    for _ in range(10):
        call()
    per = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            call()
        end.record()
        torch.cuda.synchronize()
        per.append(start.elapsed_time(end) * 1000 / calls)
    return statistics.median(per)


def sdpa_table() -> None:
    """SDPA alone at BERT-base's shape (64 x 12 heads x 128 x 64, bf16, q/k/v as views of one QKV GEMM's output, as
    the qkv pass makes them): microseconds per call (median of 5 rounds of 200 calls) by backend and mask form."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    b, h, s, d = 64, 12, 128, 64
    qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    keep = torch.ones(b, s, dtype=torch.bool, device="cuda")
    masks: dict[str, torch.Tensor | None] = {
        "none": None,
        "bool [B,1,1,S]": keep[:, None, None, :],
        "bool [B,1,S,S] (HF's)": keep[:, None, None, :].expand(b, 1, s, s).contiguous(),
        "bf16 additive [B,1,1,S]": torch.zeros(b, 1, 1, s, device="cuda", dtype=torch.bfloat16),
        "bf16 additive [B,1,S,S]": torch.zeros(b, 1, s, s, device="cuda", dtype=torch.bfloat16),
    }
    backends = {"cuDNN": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}
    ref = torch.nn.functional.scaled_dot_product_attention(q.float(), k.float(), v.float())
    print(f"\nSDPA alone, {b} x {h} heads x {s} x {d}, bf16, {torch.cuda.get_device_name(0)}: us per call (FLOP rate)")
    print(f"{'mask':26}" + "".join(f"{n:>20}" for n in backends))
    flop = 4 * b * h * s * s * d
    for mname, mask in masks.items():
        cells = []
        for backend in backends.values():
            try:
                with sdpa_kernel([backend]), torch.inference_mode():
                    call = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=mask)
                    out = call()
                    err = float((out.float() - ref).abs().max())
                    us = us_per_call(call)
                cells.append(f"{us:7.1f} ({flop / us / 1e6:4.0f} TF)" + ("" if err < 0.05 else f" err {err:.2f}"))
            except RuntimeError as e:
                cells.append("n/a: " + str(e).split("\n")[0][:14])
        print(f"{mname:26}" + "".join(f"{c:>20}" for c in cells), flush=True)


class KeyMaskAttention(FusedQKVAttention):
    """kiln's qkv layer given only the first query row of the encoder's mask, [B,1,1,S] for [B,1,S,S]: the same
    attention where every row of the mask is alike (a padding mask built from a [B,S] attention_mask), and a
    smaller mask for SDPA's kernels to read."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, *args: Any,
                **kwargs: Any) -> tuple[torch.Tensor, None]:
        if attention_mask is not None and attention_mask.dim() == 4:
            attention_mask = self.cut(attention_mask[:, :, :1, :], hidden_states.dtype)
        return super().forward(hidden_states, attention_mask, *args, **kwargs)

    def cut(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return mask


class AdditiveKeyMaskAttention(KeyMaskAttention):
    """The same, the boolean mask turned into an additive one in the model's dtype (0 or -inf)."""

    def cut(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if mask.dtype != torch.bool:
            return mask
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))


def kernel_us(call: Callable[[], Any], calls: int = 10) -> tuple[float, list[tuple[float, str]]]:
    """CUDA kernel time per call (the sum over kernels) and the kernels by time, from torch.profiler."""
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    kernels = [(e.device_time_total / calls, e.key[:60]) for e in prof.key_averages() if e.device_time_total > 0]
    return sum(us for us, _ in kernels), sorted(kernels, reverse=True)


def kiln_rows(ids: torch.Tensor, ones: torch.Tensor, ref: torch.Tensor, *, everything: bool = False,
              ) -> list[tuple[str, float, float, str]]:
    """kiln's own compile/bf16+epilogue+qkv+cudagraphs (built by kiln.build from bench/gpu_models.py, loaded by kiln.load)
    against the same module with the same kiln transforms compiled by hand (mode="reduce-overhead"); with
    `everything`, kiln's other compile variants loaded in the same process too. The rows say where kiln's path
    loses, the kernel sums whether the GPU runs other kernels, the CUDA API counts whether a call is one graph."""
    import tempfile

    import numpy as np
    from safetensors.torch import save_model

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_models import BertEncoder

    import kiln
    from kiln.recipe import Recipe
    from kiln.transforms import apply

    variant = "compile/bf16+epilogue+qkv+cudagraphs"
    variants = [variant]
    if everything:  # the same process state as bench/gpu.py: every variant built (and compiled) before the load
        from gpu import MODELS

        variants = [v for v in MODELS["bert"]["variants"] if v.startswith(("eager", "compile"))]
    work = Path(tempfile.mkdtemp(prefix="kiln-lever-"))
    torch.manual_seed(0)
    module = BertEncoder().eval()
    save_model(module, str(work / "bert.safetensors"))
    np.savez(work / "bert.npz", ids=ids[:16].cpu().numpy(), mask=ones[:16].cpu().numpy())
    t0 = time.perf_counter()
    kiln.build(f"{Path(__file__).resolve().parent}/gpu_models.py:BertEncoder", weights=work / "bert.safetensors",
               inputs=["ids:int64[batch,seq]@0..30521", "mask:int64[batch,seq]@1..1"], repo=work / "models", name="bert",
               data=work / "bert.npz", device="cuda", batch=(1, 64), dim_size={"seq": 128}, variants=variants,
               objective="throughput")
    print(f"  kiln build {variant}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    runner = kiln.load(work / "models" / "bert", device="cuda", variant=variant)
    hand = apply(copy.deepcopy(module), Recipe.parse("bf16+epilogue+qkv")).cuda().eval()
    with torch.inference_mode():
        rows = []
        cases: list[tuple[str, Callable[[], Any]]] = [("kiln.load runner.run (bucketed graphs, fp32 out)",
                                                        lambda: runner.run([ids, ones])[0])]
        for other in (v for v in variants if v.startswith("compile/") and v.endswith("cudagraphs") and v != variant):
            r2 = kiln.load(work / "models" / "bert", device="cuda", variant=other)
            cases.append((f"kiln.load {other}", functools.partial(lambda r: r.run([ids, ones])[0], r2)))
        torch._dynamo.reset()
        g = torch.compile(hand, mode="reduce-overhead")
        cases.append(("same transforms, compile reduce-overhead by hand", lambda: g(ids, ones)))
        g2 = torch.compile(copy.deepcopy(hand), mode="reduce-overhead", dynamic=True)
        cases.append(("same, by hand, dynamic=True", lambda: g2(ids, ones)))
        g3 = torch.compile(apply(copy.deepcopy(module), Recipe.parse("bf16+epilogue")).cuda().eval(),
                           mode="reduce-overhead")
        cases.append(("by hand without qkv (bf16+epilogue)", lambda: g3(ids, ones)))
        for label, call in cases:
            out = call().clone()
            s = timed(call)
            total, kernels = kernel_us(call)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(10):
                    call()
                torch.cuda.synchronize()
            api = {e.key: e.count // 10 for e in prof.key_averages() if e.key in ("cudaGraphLaunch", "cudaLaunchKernel",
                                                                                    "cuLaunchKernel", "cuLaunchKernelEx")}
            print(f"  {label}: CUDA API calls per call {api}", file=sys.stderr, flush=True)
            top = "; ".join(f"{k} {us:,.0f}us" for us, k in kernels[:4])
            rows.append((label, 64 / s, cosine(out, ref), f"kernels {total:,.0f} us/batch: {top}"))
            print(f"  {rows[-1]}", file=sys.stderr, flush=True)
            print(f"  {label}: every kernel, us per batch", file=sys.stderr)
            for us, k in kernels[:25]:
                print(f"      {us:8,.1f}  {k}", file=sys.stderr)
    return rows


def profile_table(bf16: Any, ids: torch.Tensor, ones: torch.Tensor) -> None:
    """Kernel by kernel: the bf16 compile variant's CUDA time per batch, grouped, and the GEMMs' achieved TFLOP/s."""
    torch._dynamo.reset()
    g = torch.compile(bf16, mode="reduce-overhead")
    with torch.inference_mode():
        call = lambda: g(input_ids=ids, attention_mask=ones).last_hidden_state  # noqa: E731
        for _ in range(5):
            call()
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                call()
            torch.cuda.synchronize()
    groups: dict[str, float] = {}
    top = []
    for e in prof.key_averages():
        us = e.device_time_total / 10  # per batch
        if us <= 0:
            continue
        kind = kernel_kind(e.key)
        groups[kind] = groups.get(kind, 0.0) + us
        top.append((us, kind, e.key[:70], e.count // 10))
    total = sum(groups.values())
    gemm_flop = 2 * 64 * 128 * 768 * (3 * 768 + 768 + 2 * 3072) * 12
    print(f"\nwhere one batch (64 x 128) goes, compile/bf16+cudagraphs, {torch.cuda.get_device_name(0)}: {total:,.0f} us of kernels")
    for kind, us in sorted(groups.items(), key=lambda kv: -kv[1]):
        extra = f"  ({gemm_flop / us / 1e6:,.0f} TFLOP/s achieved)" if kind == "GEMM" else ""
        print(f"  {kind:32} {us:8,.0f} us {us / total:6.1%}{extra}")
    print("  top kernels:")
    for us, kind, key, calls in sorted(top, reverse=True)[:10]:
        print(f"    {us:7,.0f} us  x{calls:<3} {kind:10} {key}")


if __name__ == "__main__":
    sys.exit(main())
