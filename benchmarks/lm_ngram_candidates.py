"""An estimate: how many more tokens per forward would verifying K n-gram candidates per
sweep give, against the one candidate `LMDecoding.guess` proposes?

Decodes each prompt with the sequential loop (the true continuation), then simulates a
decoder that, at each certified prefix, proposes the tokens after the K latest earlier
occurrences of the last two tokens (then of the last token) in the prompt and the certified
output, and accepts 1 + the longest run of a candidate that matches the continuation (at most
ngram - 1). No model call is simulated beyond the truth, and the Jacobi trajectory's own
guesses are left out: an estimate of the n-gram part only. CPU is enough.

    PYTHONPATH=src python benchmarks/lm_ngram_candidates.py FOLDER [T] [PROMPTS_PER_KIND]
"""

import sys

import torch

import ffsolve
from ffsolve.experiments.lm_decoding import KINDS, load_prompts, prompt_ids
from ffsolve.models.smollm import load_smollm2
from ffsolve.problems import LMDecoding

NGRAM = 8
folder = sys.argv[1] if len(sys.argv) > 1 else None
T = int(sys.argv[2]) if len(sys.argv) > 2 else 64
per = int(sys.argv[3]) if len(sys.argv) > 3 else 3
model, tok = load_smollm2(folder, "cpu")
prompts = load_prompts()
chosen = [p for k in KINDS for p in [q for q in prompts if q["kind"] == k][:per]]
runs = []
with torch.no_grad():
    for p in chosen:
        ids = prompt_ids(tok, p)
        problem = LMDecoding(model, [ids], T, eos_id=tok.eos_token_id)
        cont = problem.tokens(ffsolve.solve(problem, method="sequential").value)[0]
        runs.append((p["kind"], ids, cont))


def candidates(seq: list[int], c: int) -> list[int]:
    """Starts of the continuations after earlier occurrences of the last two tokens before
    column c, then of the last one, latest first."""
    out: list[int] = []
    for key in (2, 1):
        for i in range(c - 1, key - 1, -1):
            if seq[i - key : i] == seq[c - key : c] and i not in out:
                out.append(i)
    return out


def tokens_per_forward(k: int) -> dict[str, float]:
    done: dict[str, list[int]] = {}
    for kind, ids, cont in runs:
        seq, c, end, sweeps = ids + cont, len(ids), len(ids) + len(cont), 0
        while c < end:
            best = 0
            for i in candidates(seq, c)[:k]:
                m = 0
                while m < NGRAM - 1 and c + m < end and i + m < c and seq[i + m] == seq[c + m]:
                    m += 1
                best = max(best, m)
            c, sweeps = c + 1 + best, sweeps + 1
        tally = done.setdefault(kind, [0, 0])
        tally[0], tally[1] = tally[0] + len(cont), tally[1] + sweeps
    total = [sum(v[0] for v in done.values()), sum(v[1] for v in done.values())]
    return {**{kind: a / b for kind, (a, b) in done.items()}, "all": total[0] / total[1]}


print(f"estimate, n-gram guesses only: {len(runs)} prompts, T={T}, ngram {NGRAM}")
for k in (1, 2, 4, 8, 16):
    row = tokens_per_forward(k)
    print(f"  K={k:2d} candidates: " + "  ".join(f"{n} {v:.2f}" for n, v in row.items()))
