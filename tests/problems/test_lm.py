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


@pytest.mark.parametrize("temperature", [0.0, 0.9])
@pytest.mark.parametrize("ngram", [0, 4])
@pytest.mark.parametrize("method,opts", METHODS, ids=[f"{m}{o}" for m, o in METHODS])
def test_tokens_equal_the_sequential_loop(method, opts, ngram, temperature):
    model = _llama()
    gumbel = lm_gumbel(3, 20, 48, torch.Generator().manual_seed(1)) if temperature else None
    problem = LMDecoding(model, PROMPTS, 20, temperature=temperature, gumbel=gumbel,
                         eos_id=11, ngram=ngram)  # fmt: skip
    with torch.no_grad():
        ref = ffsolve.solve(problem, method="sequential")
        assert problem.sweeps_forwarded == 20  # the prompt (giving token 0), then one per call
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


@pytest.mark.parametrize("method,opts", [("jacobi", {}), ("anderson", {})])
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
