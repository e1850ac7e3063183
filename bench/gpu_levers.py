"""One GPU lever, measured before it is built: does dropping BERT's all-ones attention mask (so SDPA may take the
flash kernel) speed up BERT-base at batch 64, sequence 128?

    python3 bench/gpu_levers.py            # one H100/H200; about two minutes (two torch.compile builds)

BERT-base (random weights, bf16, SDPA attention) under torch.compile(mode="reduce-overhead"), called with the
all-ones mask and with mask=None; seq/s (median of 20 timed rounds of 10 calls each) and the attention kernels the
profiler saw, and the largest difference between the two outputs.
"""

from __future__ import annotations

import statistics
import sys
import time

import torch


def main() -> int:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(attn_implementation="sdpa"), add_pooling_layer=False).eval().cuda().bfloat16()
    ids = torch.randint(0, 30522, (64, 128), device="cuda")
    ones = torch.ones(64, 128, dtype=torch.int64, device="cuda")
    rows = {}
    outs = {}
    for label, mask in (("all-ones mask", ones), ("mask dropped (None)", None)):
        torch._dynamo.reset()
        f = torch.compile(model, mode="reduce-overhead")
        with torch.inference_mode():
            for _ in range(5):
                out = f(input_ids=ids, attention_mask=mask).last_hidden_state
            outs[label] = out.float().clone()
            torch.cuda.synchronize()
            per = []
            for _ in range(20):
                t0 = time.perf_counter()
                for _ in range(10):
                    f(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
                per.append((time.perf_counter() - t0) / 10)
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                f(input_ids=ids, attention_mask=mask)
                torch.cuda.synchronize()
        kernels = sorted({e.key for e in prof.key_averages() if "attention" in e.key.lower() or "fmha" in e.key.lower()
                          or "flash" in e.key.lower()})
        rows[label] = (64 / statistics.median(per), kernels)
    a, b = outs.values()
    print(f"\nBERT-base bf16, batch 64, seq 128, torch.compile reduce-overhead, {torch.cuda.get_device_name(0)}")
    base = rows["all-ones mask"][0]
    for label, (rate, kernels) in rows.items():
        print(f"{label:22} {rate:>9,.0f} seq/s  {rate / base:5.2f}x  attention kernels: {', '.join(k[:60] for k in kernels) or '-'}")
    print(f"max |difference| between the two outputs: {(a - b).abs().max().item():.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
