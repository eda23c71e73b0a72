"""Which kernels a SmolLM2-shaped forward should use at a few tokens: float32 (TF32 off)
GEMMs of its layer shapes at n = 1..64 rows in three layouts, attention over the cache's
capacity (fused SDPA against plain matmul-softmax-matmul) and RMSNorm (transformers' module
against torch's `rms_norm`), each captured in a CUDA graph 100 times and replayed: us per
call. Random weights (no download). Prints a table; no records.

From the repository root:  PYTHONPATH=src python benchmarks/profile_lm_kernels.py [cuda|cpu]
"""

import sys
import time

import torch
from torch.nn import functional as F

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
cuda = dev.type == "cuda"
torch.backends.cuda.matmul.allow_tf32 = False
REPS = 100 if cuda else 3
ROWS = (1, 8, 16, 24, 32, 48, 64)
g = torch.Generator().manual_seed(0)


def per_call_us(fn) -> float:
    """us per call of fn: REPS calls captured in one graph and replayed (eager on the CPU)."""
    fn()
    if cuda:
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        with torch.cuda.graph(graph):
            for _ in range(REPS):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
        return (time.perf_counter() - t0) / (5 * REPS) * 1e6
    t0 = time.perf_counter()
    for _ in range(REPS):
        fn()
    return (time.perf_counter() - t0) / REPS * 1e6


def rand(*shape):
    return torch.randn(*shape, generator=g).to(dev)


print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}")
print("1. float32 GEMMs (us): F.linear(x, W) | (W @ x.T).T | x padded to 32 rows")
for out_f, in_f in ((576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)):
    W = rand(out_f, in_f)
    cells = []
    for n in ROWS:
        x = rand(1, n, in_f)
        pad = torch.zeros(1, max(32, n), in_f, device=dev)

        def padded(x=x, pad=pad, n=n, W=W):
            pad[:, :n].copy_(x)
            return F.linear(pad, W)

        a = per_call_us(lambda x=x, W=W: F.linear(x, W))
        b = per_call_us(lambda x=x, W=W: (W @ x[0].T).T)
        c = per_call_us(padded)
        cells.append(f"n={n}: {a:6.1f} {b:6.1f} {c:6.1f}")
    print(f"   {out_f}x{in_f}: " + " | ".join(cells))
print("2. attention, 9 query heads on 3 key heads, head 64, 256 columns (us): sdpa | manual")
L = 256
for n in (1, 8, 16, 32):
    q, k, v = rand(1, 9, n, 64), rand(1, 9, L, 64), rand(1, 9, L, 64)
    mask = torch.arange(L, device=dev)[None, :] <= torch.arange(n, device=dev)[:, None] + 100
    mask = mask[None, None]

    def manual(q=q, k=k, v=v, mask=mask):
        s = (q @ k.transpose(-1, -2)) * 0.125
        return torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v

    a = per_call_us(lambda q=q, k=k, v=v, mask=mask: F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, scale=0.125))  # fmt: skip
    print(f"   n={n:2d}: {a:6.1f} {per_call_us(manual):6.1f}")
print("3. RMSNorm over 576 (us): transformers' formula | F.rms_norm")
w = rand(576)
for n in (1, 32):
    x = rand(1, n, 576)

    def hf(x=x):
        h = x.to(torch.float32)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-5)
        return w * h.to(x.dtype)

    fused = per_call_us(lambda x=x: F.rms_norm(x, (576,), w, 1e-5))
    print(f"   n={n:2d}: {per_call_us(hf):6.1f} {fused:6.1f}")
