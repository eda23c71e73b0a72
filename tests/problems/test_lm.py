"""LMDecoding: greedy and sampled decoding of a causal LM as a triangular system, on a tiny
randomly initialised Llama (no download)."""

import pytest
import torch

import ffsolve
from ffsolve.problems import LMDecoding, lm_gumbel

transformers = pytest.importorskip("transformers")
D64 = torch.float64


def _llama(vocab=48, seed=0):
    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).to(D64).eval()


PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [5, 5, 5, 5, 5, 5]]
METHODS = [
    ("jacobi", {}),
    ("gs_jacobi", {"window": 5}),
    ("gs_jacobi", {"window": 16}),
    ("jacobi_gs", {"block_size": 4}),
    ("anderson", {}),
]


@pytest.mark.parametrize("cache", ["static", "dynamic"])
@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("ngram", [0, 4])
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
def test_tokens_equal_the_sequential_loop(method, opts, ngram, temperature, cache):
    model = _llama()
    gumbel = lm_gumbel(3, 20, 48, torch.Generator().manual_seed(1)) if temperature else None
    problem = LMDecoding(model, PROMPTS, 20, temperature=temperature, gumbel=gumbel,
                         eos_id=11, ngram=ngram, cache=cache)  # fmt: skip
    assert problem.cache == cache
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential")
        # the prompt (dynamic: with token 0's logits; static: but its last token), then one
        # model call per new token (static: from the prompt's last token)
        assert problem.sweeps_forwarded == 20 + (cache == "static")
        sol = ffsolve.solve(problem, method=method, **opts)
    assert torch.equal(sol.value, ref.value)
    assert sol.num_iters <= 20


def test_greedy_equals_generate_per_prompt():
    model = _llama()
    problem = LMDecoding(model, PROMPTS, 24, eos_id=None)
    with torch.no_grad():
        sol = ffsolve.solve(problem, method="gs_jacobi", window=8)
        for b, prompt in enumerate(PROMPTS):
            out = model.generate(torch.tensor([prompt]), max_new_tokens=24, do_sample=False,
                                 min_new_tokens=24, pad_token_id=0)  # fmt: skip
            assert out[0, len(prompt) :].tolist() == sol.value[b].long().tolist()


def test_the_window_runs_the_model_on_the_window_only():
    """After the prompt, a sliding window feeds at most `window` tokens per sweep: the
    certified prefix stays in the KV cache."""
    model = _llama()
    problem = LMDecoding(model, PROMPTS[:1], 40)
    with torch.no_grad():
        sol = ffsolve.solve(problem, method="gs_jacobi", window=6)
    assert problem.tokens_forwarded <= 6 * sol.num_iters
    assert problem.sweeps_forwarded == sol.num_iters + 1  # one call per sweep, and the prompt


def test_each_item_finishes_on_its_own_after_eos():
    model = _llama()
    with torch.no_grad():
        free = ffsolve.solve(LMDecoding(model, PROMPTS, 16), method="sequential").value
    eos = int(free[0, 3])  # make item 0's fourth token the end of its sequence
    problem = LMDecoding(model, PROMPTS, 16, eos_id=eos, pad_id=0)
    with torch.no_grad():
        sol = ffsolve.solve(problem, method="gs_jacobi", window=8)
    first = problem.tokens(sol.value)[0]
    assert first[-1] == eos and len(first) <= 4
    assert bool((sol.value[0, len(first) :] == 0).all())


def test_guesses_from_the_prompt_save_sweeps_on_a_repetitive_model():
    """A model whose next token is a function of the last one (a cycle 1, 2, 3, 4): plain
    Jacobi certifies one token a sweep, the prompt's n-grams predict the output, so
    lookahead certifies several."""

    class Copy(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.LlamaConfig(vocab_size=16, max_position_embeddings=64)
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.training = False

        def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True,
                    past_key_values=None):  # fmt: skip
            seq = torch.cat([past_key_values.tokens, input_ids], 1)
            past_key_values.tokens = seq
            logits = torch.nn.functional.one_hot(seq % 4 + 1, 16).double()
            logits = logits[:, -input_ids.shape[1] :]
            return type("Out", (), {"logits": logits, "past_key_values": past_key_values})

        def __call__(self, **kw):
            kw.setdefault("past_key_values", _TokenCache())
            return self.forward(**kw)

    prompt = [[1, 2, 3, 4] * 3]
    with torch.no_grad():
        plain = ffsolve.solve(LMDecoding(Copy(), prompt, 24), method="gs_jacobi", window=8)
        ahead = ffsolve.solve(LMDecoding(Copy(), prompt, 24, ngram=6), method="gs_jacobi",
                              window=8)  # fmt: skip
    assert torch.equal(plain.value, ahead.value)
    assert ahead.num_iters < plain.num_iters / 2


class _TokenCache:
    """A stand-in cache that keeps the fed tokens (and can be cropped)."""

    def __init__(self):
        self.tokens = torch.empty(1, 0, dtype=torch.long)

    def get_seq_length(self):
        return self.tokens.shape[1]

    def crop(self, n):
        self.tokens = self.tokens[:, :n]


def test_bad_inputs_give_one_clear_error():
    model = _llama()
    with pytest.raises(ValueError, match="at least one token"):
        LMDecoding(model, [[1, 2], []], 4)
    with pytest.raises(ValueError, match="exceeds the model's context of 128"):
        LMDecoding(model, [[1] * 100], 40)
    with pytest.raises(ValueError, match="needs gumbel noise"):
        LMDecoding(model, [[1]], 4, temperature=0.5)
    bad = lm_gumbel(1, 4, 48, torch.Generator().manual_seed(0))
    bad[0, 2, 5] = float("nan")
    with pytest.raises(ValueError, match="gumbel noise holds NaN"):
        LMDecoding(model, [[1]], 4, temperature=0.5, gumbel=bad)
    with pytest.raises(ValueError, match="token ids must lie"):
        LMDecoding(model, [[1, 99]], 4)
    model.train()
    with pytest.raises(ValueError, match="training mode"):
        LMDecoding(model, [[1]], 4)
    t5 = transformers.T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2)
    encdec = transformers.T5ForConditionalGeneration(t5).eval()
    with pytest.raises(ValueError, match="encoder-decoder"):
        LMDecoding(encdec, [[1]], 4)


def test_token_ids_are_checked_when_the_problem_is_made():
    # was: eos_id / pad_id outside the vocabulary failed inside torch at solve time, 1.5 was
    # truncated to token 1, and a text prompt gave an unclear TypeError
    model = _llama()
    for name in ("eos_id", "pad_id"):
        for bad in (48, -1, 2.0, True):
            with pytest.raises(
                ValueError, match=rf"{name} must be None or a token id in \[0, 48\)"
            ):
                LMDecoding(model, [[1, 2]], 4, **{name: bad})
    with pytest.raises(TypeError, match=r"prompt 0: token ids must be ints, got 1.5"):
        LMDecoding(model, [[1.5, 2]], 4)
    with pytest.raises(TypeError, match="integer token ids, got torch.float32"):
        LMDecoding(model, torch.tensor([[1.5, 2.0]]), 4)
    for text in ("hello", ["hello", "world"], b"hi"):
        with pytest.raises(TypeError, match="not text: encode them first"):
            LMDecoding(model, text, 4)
    with pytest.raises(TypeError, match="prompt 1 must be a list"):
        LMDecoding(model, [[1], 2], 4)
    with pytest.raises(TypeError, match="got int"):
        LMDecoding(model, 3, 4)
    with pytest.raises(ValueError, match="at least one token"):
        LMDecoding(model, torch.zeros(2, 0, dtype=torch.long), 4)
    ok = LMDecoding(model, torch.tensor([[1, 2]]), 2, eos_id=47, pad_id=0)
    assert ok.eos_id == 47 and ok.prompt_ids.tolist() == [[1, 2]]


@pytest.mark.parametrize(
    "method,opts", [("jacobi", {}), ("anderson", {}), ("gs_jacobi", {"window": 4})]
)
@pytest.mark.parametrize("ngram", [0, 4])
def test_a_batch_that_has_ended_stops_sweeping(method, opts, ngram):
    """Every item of this batch reaches EOS (33) by new token 4 of 24: the positions after it
    are padding, final as soon as EOS is, so the solve ends a few sweeps later instead of
    running one sweep per position."""
    model = _llama()
    problem = LMDecoding(model, PROMPTS, 24, eos_id=33, ngram=ngram)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        ended = [row.index(33) for row in ref.long().tolist()]
        sol = ffsolve.solve(problem, method=method, **opts)
    assert max(ended) <= 4 and torch.equal(sol.value, ref)
    assert sol.num_iters <= max(ended) + 3, sol.stats["iters_per_item"]


def test_the_static_cache_gives_the_models_own_logits():
    """StaticKV runs the model's modules over columns written by position: its logits are
    the transformers forward's over the whole left-padded sequence, to float32 rounding."""
    from ffsolve.models.static_lm import StaticKV

    model = _llama().float()
    P, T = 8, 10
    ids = torch.zeros(3, P, dtype=torch.long)
    mask = torch.zeros(3, P, dtype=torch.long)
    for b, p in enumerate(PROMPTS):
        ids[b, P - len(p) :], mask[b, P - len(p) :] = torch.tensor(p), 1
    row = torch.cat(
        [ids, torch.randint(0, 48, (3, T), generator=torch.Generator().manual_seed(0))], 1
    )
    full = torch.cat([mask, torch.ones(3, T, dtype=torch.long)], 1)
    with torch.no_grad():
        ref = model(input_ids=row, attention_mask=full,
                    position_ids=(full.cumsum(1) - 1).clamp(min=0)).logits  # fmt: skip
        kv = StaticKV(model, 3, P + T, P - mask.sum(1))
        kv.forward(row[:, : P - 1], torch.arange(P - 1))
        window = kv.forward(row[:, P - 1 : P + 5], torch.arange(P - 1, P + 5))
        rest = kv.forward(row[:, P + 2 :], torch.arange(P + 2, P + T))  # re-feeds 3 columns
    scale = ref.abs().max()
    assert (window - ref[:, P - 1 : P + 5]).abs().max() <= 1e-5 * scale
    assert (rest - ref[:, P + 2 :]).abs().max() <= 1e-5 * scale


@pytest.mark.parametrize("ngram", [0, 4])
def test_a_window_on_the_device_is_the_host_placed_window(ngram):
    """The static cache moves the window on the device (`evaluate_window`): sweep for sweep
    it feeds the columns the host-placed window feeds, so values and counts are bitwise
    those of the host path."""
    model = _llama()
    runs = []
    for on_device in (True, False):
        problem = LMDecoding(model, PROMPTS, 24, eos_id=11, ngram=ngram, cache="static")
        problem.window_on_device = on_device
        with torch.no_grad():
            runs.append(ffsolve.solve(problem, method="gs_jacobi", window=6))
            ref = ffsolve.solve(problem, method="sequential").value
    dev, host = runs
    assert torch.equal(dev.value, host.value) and torch.equal(dev.certified, host.certified)
    assert dev.num_iters == host.num_iters and torch.equal(dev.value, ref)


def test_the_static_cache_is_refused_for_a_model_it_cannot_run():
    t5 = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=64)
    gpt2 = transformers.GPT2LMHeadModel(t5).eval()
    with pytest.raises(ValueError, match="model type 'gpt2' is not one of the Llama layout"):
        LMDecoding(gpt2, [[1, 2]], 4, cache="static")
    assert LMDecoding(gpt2, [[1, 2]], 4).cache == "dynamic"  # auto: transformers' own cache
    with pytest.raises(ValueError, match="cache must be 'auto', 'static' or 'dynamic'"):
        LMDecoding(_llama(), [[1, 2]], 4, cache="paged")
    with pytest.raises(ValueError, match="ngram must be 0"):
        LMDecoding(_llama(), [[1, 2]], 4, ngram=1)


def test_a_gpt2_decodes_exactly_through_the_dynamic_cache():
    cfg = transformers.GPT2Config(vocab_size=32, n_embd=16, n_layer=2, n_head=2, n_positions=64)
    torch.manual_seed(0)
    gpt2 = transformers.GPT2LMHeadModel(cfg).double().eval()
    problem = LMDecoding(gpt2, PROMPTS, 16, ngram=4)
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential").value
        sol = ffsolve.solve(problem, method="gs_jacobi", window=5)
    assert torch.equal(sol.value, ref)


def test_changing_the_ngram_drops_the_captured_loops():
    """A captured loop replays the guesses it was recorded with: a new ngram must not reuse
    it (the lm-decoding experiment runs jacobi and lookahead rows on one problem)."""
    problem = LMDecoding(_llama(), PROMPTS, 8)
    problem.graphs.get("loop", lambda: "recorded with ngram 0")
    problem.ngram = 0
    assert len(problem.graphs) == 1  # unchanged: kept
    problem.ngram = 4
    assert len(problem.graphs) == 0 and problem.ngram == 4
    with pytest.raises(ValueError, match="ngram must be 0"):
        problem.ngram = -2


def test_new_weights_reach_the_static_cache_at_the_next_solve():
    """The static cache joins the q/k/v and gate/up projections into copies of their
    weights: a solve after the weights changed (training, loading) reads the new ones."""
    model = _llama()
    problem = LMDecoding(model, PROMPTS, 12, cache="static")
    with torch.no_grad():
        before = ffsolve.solve(problem, method="gs_jacobi", window=4).value
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.mul_(-2.0)
        after = ffsolve.solve(problem, method="gs_jacobi", window=4).value
        fresh = ffsolve.solve(LMDecoding(model, PROMPTS, 12, cache="dynamic"), method="sequential")
    assert not torch.equal(before, after) and torch.equal(after, fresh.value)


def test_a_compiled_layer_function_gives_the_plain_tokens():
    """compile= runs the static cache's one layer function through torch.compile (here the
    aot_eager backend: the traced graph of aten ops, no compiler needed), compiled once per
    shape and shared by every layer; capacity= makes problems of several prompt lengths
    share those shapes. The tokens are the plain problem's, for every method."""
    model = _llama()
    with torch.no_grad():
        for prompts in (PROMPTS, [[4, 4, 1, 2]]):
            plain = LMDecoding(model, prompts, 16, eos_id=11, ngram=4, cache="static")
            compiled = LMDecoding(model, prompts, 16, eos_id=11, ngram=4, cache="static",
                                  compile="aot_eager", capacity=40)  # fmt: skip
            ref = ffsolve.solve(plain, method="sequential").value
            for method, opts in [("sequential", {}), ("gs_jacobi", {"window": 5}), ("jacobi", {})]:
                sol = ffsolve.solve(compiled, method=method, **opts)
                assert torch.equal(sol.value, ref), method
            assert compiled._kv.L == 40 and compiled._kv.backend == "aot_eager"


def test_compile_and_capacity_are_checked():
    model = _llama()
    with pytest.raises(ValueError, match="capacity must be an int >= the longest prompt plus"):
        LMDecoding(model, PROMPTS, 16, capacity=20)
    with pytest.raises(ValueError, match="for the static cache only"):
        LMDecoding(model, PROMPTS, 16, cache="dynamic", compile="inductor")
    with pytest.raises(ValueError, match="a torch.compile backend name"):
        LMDecoding(model, PROMPTS, 16, compile=True)
