"""A hand-written Triton attention kernel against SDPA at BERT's shape and others, alone on the GPU (measured as
a lever, not kept: cuDNN's kernel with no mask or a key-only one is faster, and in kiln's build, as an `attn` pass,
BERT timed the same with it as with cuDNN's; README, GPU section).

    python3 bench/gpu_attention.py

The kernel gives each program BLOCK_M query rows of one (sequence, head), loops over key blocks with an online
softmax (one block at 128 tokens), reads the mask as given (boolean or additive, broadcast by stride 0) and writes
[batch, seq, heads, dim], the layout the layer reshapes from without a copy.

For each shape (BERT-base's 64 x 12 heads x 128 x 64 first) and mask form (none; boolean [B,1,S,S] as a Hugging Face
encoder hands it to its layers; bf16 additive [B,1,1,S]), q, k and v are views of one QKV GEMM's output, as the
`qkv` pass makes them. Columns: SDPA as dispatched, cuDNN's and flash's kernels by name ('-' where they refuse the
mask), the Triton kernel's best configuration (block_m / warps / stages) and every configuration's time, us per call
(median of 5 rounds of 200 calls), and the kernel's worst absolute error against SDPA in float64 on a padded mask.
The model-level numbers are `bench/gpu_levers.py --lever keymask`.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


@functools.cache
def _kernel() -> Any:
    import triton
    import triton.language as tl

    @triton.jit
    def fwd(Q, K, V, M, Out, qk_scale,  # qk_scale: softmax scale times log2(e), so exp2 stands for exp
            sqb, sqh, sqs, skb, skh, sks, svb, svh, svs, smb, smh, smq, smk, sob, soh, sos,
            H, SQ, SK,
            D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
            EVEN_M: tl.constexpr, EVEN_N: tl.constexpr):
        start_m = tl.program_id(0)
        bh = tl.program_id(1)
        b = bh // H
        h = bh % H
        rows = start_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        dims = tl.arange(0, D)
        q_ptrs = Q + b * sqb + h * sqh + rows[:, None] * sqs + dims[None, :]
        if EVEN_M:
            q = tl.load(q_ptrs)
        else:
            q = tl.load(q_ptrs, mask=rows[:, None] < SQ, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, D], tl.float32)
        for start_n in range(0, SK, BLOCK_N):
            cols = start_n + offs_n
            k_ptrs = K + b * skb + h * skh + cols[:, None] * sks + dims[None, :]
            v_ptrs = V + b * svb + h * svh + cols[:, None] * svs + dims[None, :]
            if EVEN_N:
                k = tl.load(k_ptrs)
                v = tl.load(v_ptrs)
            else:
                k = tl.load(k_ptrs, mask=cols[:, None] < SK, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < SK, other=0.0)
            s = tl.dot(q, tl.trans(k)) * qk_scale
            if MASK != 0:
                m_ptrs = M + b * smb + h * smh + rows[:, None] * smq + cols[None, :] * smk
                if EVEN_M and EVEN_N:
                    mv = tl.load(m_ptrs)
                else:
                    mv = tl.load(m_ptrs, mask=(rows[:, None] < SQ) & (cols[None, :] < SK), other=0)
                if MASK == 1:  # boolean: True keeps the key
                    s = tl.where(mv != 0, s, float("-inf"))
                else:  # additive
                    s = s + mv.to(tl.float32) * 1.4426950408889634
            if not EVEN_N:
                s = tl.where(cols[None, :] < SK, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet: nothing to rescale
            alpha = tl.math.exp2(m_i - m_safe)
            p = tl.math.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
            m_i = m_new
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        o_ptrs = Out + b * sob + h * soh + rows[:, None] * sos + dims[None, :]
        if EVEN_M:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty))
        else:
            tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=rows[:, None] < SQ)

    return fwd


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, *,
           block_m: int = 64, block_n: int = 128, warps: int = 4, stages: int = 1) -> torch.Tensor:
    """softmax(q @ k^T * scale + mask) @ v with the Triton kernel: q [B, H, SQ, D], k and v [B, H, SK, D] (any
    strides with the last dim contiguous), mask broadcastable to [B, H, SQ, SK] (boolean: True keeps; or
    additive). Returns [B, H, SQ, D] as a view of a [B, SQ, H, D] tensor."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    q, k, v = (x if x.stride(-1) == 1 else x.contiguous() for x in (q, k, v))
    out = torch.empty(b, sq, h, d, dtype=q.dtype, device=q.device).transpose(1, 2)
    kind, m = 0, q  # no mask: M is never read
    mstrides: tuple[int, ...] = (0, 0, 0, 0)
    if mask is not None:
        m = mask.expand(b, h, sq, sk)
        kind = 1 if m.dtype == torch.bool else 2
        if kind == 1:
            m = m.view(torch.uint8)
        mstrides = m.stride()
    block_n = min(block_n, max(16, 1 << (sk - 1).bit_length()))
    grid = ((sq + block_m - 1) // block_m, b * h)
    _kernel()[grid](q, k, v, m, out, scale * 1.4426950408889634,
                    *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *mstrides, *out.stride()[:3],
                    h, sq, sk, D=d, BLOCK_M=block_m, BLOCK_N=block_n, MASK=kind,
                    EVEN_M=sq % block_m == 0, EVEN_N=sk % block_n == 0, num_warps=warps, num_stages=stages)
    return out


def main() -> int:
    """The Triton kernel against SDPA (whatever backend it dispatches to, and cuDNN / flash by name),
    alone, q/k/v as views of one QKV GEMM's output as the qkv pass makes them: us per call (median of 5 rounds of
    200 calls), for each kernel configuration, and the worst error against float64 SDPA on a padded mask."""
    from gpu_levers import us_per_call
    from torch.nn.attention import SDPBackend, sdpa_kernel

    torch.manual_seed(0)

    configs = [(bm, w, st) for bm in (64, 128) for w in (4, 8) for st in (1, 2)]
    print(f"\nTriton attention kernel against SDPA, bf16, {torch.cuda.get_device_name(0)}: us per call")
    print(f"{'shape B x H x S x D':22} {'mask':16} {'SDPA':>7} {'cuDNN':>7} {'flash':>7} {'Triton best':>11} {'config':>12} "
          f"{'vs SDPA':>8} {'err':>8}  all configs (block_m/warps/stages: us)")
    for b, h, s, d in ((64, 12, 128, 64), (1, 12, 128, 64), (128, 12, 64, 64), (32, 12, 256, 64), (16, 12, 512, 64),
                       (64, 16, 128, 64), (64, 12, 384, 64)):
        qkv = torch.randn(b, s, 3, h, d, device="cuda", dtype=torch.bfloat16)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        lengths = torch.randint(s // 4, s + 1, (b,), device="cuda")
        keep = torch.arange(s, device="cuda")[None, :] < lengths[:, None]
        masks: dict[str, torch.Tensor | None] = {
            "none": None,
            "bool [B,1,S,S]": keep[:, None, None, :].expand(b, 1, s, s).contiguous(),
            "bf16 add [B,1,1,S]": torch.where(keep, 0.0, torch.finfo(torch.bfloat16).min).to(torch.bfloat16)[:, None, None, :],
        }
        for mname, mask in masks.items():
            ref = torch.nn.functional.scaled_dot_product_attention(
                q.double(), k.double(), v.double(), attn_mask=mask if mask is None or mask.dtype == torch.bool else mask.double())
            sdpa = functools.partial(torch.nn.functional.scaled_dot_product_attention, q, k, v, attn_mask=mask)
            named = []
            for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION):
                try:
                    with sdpa_kernel([backend]):
                        sdpa()
                        named.append(f"{us_per_call(sdpa):7.1f}")
                except RuntimeError:
                    named.append(f"{'-':>7}")
            base = us_per_call(sdpa)
            times = {}
            err = 0.0
            for bm, w, st in configs:
                call = functools.partial(launch, q, k, v, mask, d ** -0.5, block_m=bm, warps=w, stages=st)
                try:
                    err = max(err, float((call().double() - ref).abs().max()))
                except Exception as e:  # a configuration Triton cannot compile here: say so, time the others
                    print(f"  {b}x{h}x{s}x{d} {mname} {bm}/{w}/{st}: {type(e).__name__}: {str(e)[:120]}", file=sys.stderr)
                    continue
                times[(bm, w, st)] = us_per_call(call)
            best = min(times, key=lambda c: times[c])
            print(f"{f'{b} x {h} x {s} x {d}':22} {mname:16} {base:7.1f} {named[0]} {named[1]} {times[best]:11.1f} "
                  f"{'/'.join(map(str, best)):>12} {base / times[best]:7.2f}x {err:8.4f}  "
                  + " ".join(f"{'/'.join(map(str, c))}:{t:.1f}" for c, t in times.items()), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
