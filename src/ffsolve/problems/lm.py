"""Language-model decoding as a triangular system over the new tokens.

With the sampling noise drawn up front (Gumbel noise g_t per position), the continuation of a
prompt is token_t = argmax(logits_t / temperature + g_t) (greedy: temperature 0, no noise),
logits_t = LM(prompt, token_0..token_{t-1}): x_t = f_t(x_<t) over the T new tokens, solved by
every method; Jacobi decoding (Santilli et al. 2023) is Jacobi here, and the sliding window of
`gs_jacobi` is the window a Jacobi decoder keeps.

The KV cache holds the certified prefix: a sweep over the window [s, e) feeds the model the
tokens x_{s-1}..x_{e-2} only, after a cache of the prompt and x_0..x_{s-2}. Every cache entry
remembers the token it was computed from, and a sweep keeps exactly the entries whose tokens
are still those of the iterate (so any caller, any window, gets the right logits), which after
the loop's certificate is the whole certified prefix but its last token.

`guess` proposes tokens for the uncertified positions from an n-gram pool (lookahead decoding,
Fu et al. 2024, with prompt lookup): n-grams keyed by their first token, looked up from the
last certified token; n-grams of the prompt and of the certified output come first, n-grams of
the sweeps' own predictions (the Jacobi trajectory) only where those have none. The next sweep
verifies the guess: the output is unchanged, only the number of sweeps drops.

Positions after an end-of-sequence token hold `pad_id`: each item of a batch finishes on its own.

Exactness: a window of n tokens runs other kernels than a 1-token step, so the logits differ by
rounding and an argmax near a tie may flip; `ffsolve run lm-decoding` reports each such flip
(position, logit margin) against the plain sequential loop.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ffsolve.problems.base import Problem, check_finite

__all__ = ["LMDecoding", "lm_gumbel"]


def lm_gumbel(
    batch: int,
    steps: int,
    vocab: int,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Gumbel noise (B, T, V) for sampled decoding, drawn on the CPU in float64 from
    `generator` (the same seed gives the same continuation on every device), then moved."""
    u = torch.rand(batch, steps, vocab, generator=generator, dtype=torch.float64)
    g = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
    return g.to(device=device, dtype=dtype)


def _is_int(v: Any) -> bool:
    """An integer (Python, numpy or a 0-dim integer tensor), not a bool or a float."""
    if isinstance(v, bool):
        return False
    try:
        operator.index(v)
    except TypeError:
        return False
    return True


def _token_lists(prompts: Any) -> list[list[int]]:
    """Prompts as B lists of int token ids; anything else (text, floats such as 1.5, which
    a long tensor would truncate silently, an empty prompt) is a clear error."""
    if isinstance(prompts, Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompts must be (B, P), got {tuple(prompts.shape)}")
        if prompts.is_floating_point() or prompts.is_complex() or prompts.dtype == torch.bool:
            raise TypeError(f"a prompts tensor must hold integer token ids, got {prompts.dtype}")
        prompts = prompts.tolist()
    text = isinstance(prompts, str | bytes)
    if not text and not isinstance(prompts, list | tuple):
        raise TypeError(f"prompts must be B lists of int token ids, got {type(prompts).__name__}")
    if text or any(isinstance(p, str | bytes) for p in prompts):
        raise TypeError(
            "prompts must be token ids (B lists of ints, or a (B, P) integer tensor), not "
            "text: encode them first, e.g. tokenizer(texts).input_ids"
        )
    out = []
    for b, prompt in enumerate(prompts):
        if not isinstance(prompt, list | tuple):
            raise TypeError(f"prompt {b} must be a list of int token ids, got {prompt!r}")
        bad = next((t for t in prompt if not _is_int(t)), None)
        if bad is not None:
            raise TypeError(f"prompt {b}: token ids must be ints, got {bad!r}")
        out.append([operator.index(t) for t in prompt])
    if not out or any(len(p) == 0 for p in out):
        raise ValueError("every prompt needs at least one token (an empty prompt was given)")
    return out


class LMDecoding(Problem):
    """Decoding `steps` new tokens of a `transformers` causal LM after each prompt.

    Args:
        model: a causal LM (`AutoModelForCausalLM`), in eval mode.
        prompts: a list of B token-id lists (any lengths: left-padded here), or a (B, P) long
            tensor of equal-length prompts.
        steps: T, new tokens per prompt.
        temperature: 0 for greedy decoding, else > 0 (then `gumbel` is needed).
        gumbel: (B, T, V) noise from `lm_gumbel`, for temperature > 0.
        eos_id: the end-of-sequence token (None: none); positions after it hold `pad_id`.
        pad_id: the filler after EOS and in the left padding (default: eos_id, else 0).
        ngram: the length of the n-grams `guess` proposes (0: no guesses).

    The state is (B, T) float32 token ids (exact up to 2^24).
    """

    dim = 1

    def __init__(
        self,
        model: Any,
        prompts: list[list[int]] | Tensor,
        steps: int,
        *,
        temperature: float = 0.0,
        gumbel: Tensor | None = None,
        eos_id: int | None = None,
        pad_id: int | None = None,
        ngram: int = 0,
    ) -> None:
        config = getattr(model, "config", None)
        if config is None or not callable(model):
            raise TypeError("model must be a transformers causal LM (with a config)")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError("an encoder-decoder model is not a causal LM: use a decoder-only one")
        if model.training:
            raise ValueError("the model is in training mode (dropout): call model.eval() first")
        prompts = _token_lists(prompts)
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an int >= 1, got {steps!r}")
        V = int(config.vocab_size)
        if any(not 0 <= t < V for p in prompts for t in p):
            raise ValueError(f"prompt token ids must lie in [0, {V})")
        for name, token in (("eos_id", eos_id), ("pad_id", pad_id)):
            if token is not None and not (_is_int(token) and 0 <= token < V):
                raise ValueError(
                    f"{name} must be None or a token id in [0, {V}) (the model's vocabulary), "
                    f"got {token!r}"
                )
        limit = getattr(config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if limit is not None and longest + steps > limit:
            raise ValueError(
                f"a prompt of {longest} tokens plus {steps} new ones exceeds the model's context "
                f"of {limit}"
            )
        if temperature < 0 or temperature != temperature:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        p = next(model.parameters())
        self.device = p.device
        B = len(prompts)
        if temperature > 0:
            if gumbel is None or gumbel.shape != (B, steps, V):
                got = None if gumbel is None else tuple(gumbel.shape)
                raise ValueError(
                    f"temperature > 0 needs gumbel noise ({B}, {steps}, {V}), got {got}"
                )
            check_finite("gumbel noise", gumbel)
            self.gumbel = gumbel.to(self.device)
        else:
            self.gumbel = None
        self.model, self.temperature, self.length, self.vocab = model, temperature, steps, V
        self.eos_id = eos_id
        self.pad_id = pad_id if pad_id is not None else (eos_id if eos_id is not None else 0)
        self.ngram = ngram
        self.B, self.P = B, longest
        ids = torch.full((B, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, longest, dtype=torch.long)
        for b, prompt in enumerate(prompts):  # left padding: every prompt ends at column P - 1
            ids[b, longest - len(prompt) :] = torch.tensor(prompt)
            mask[b, longest - len(prompt) :] = 1
        self.prompt_ids, self.prompt_mask = ids.to(self.device), mask.to(self.device)
        self.prompt_lengths = self.prompt_mask.sum(1)  # (B,)
        self._cache_arg = _cache_argument(model)
        self._cache: Any = None  # the KV cache of the prompt and certified tokens
        self._kv_tokens = torch.empty(B, 0, dtype=torch.long, device=self.device)  # fed tokens
        self._first_logits: Tensor | None = None  # (B, V) the logits of position 0
        self._pool: list[dict[tuple, list[int]]] = [{} for _ in range(B)]  # verified text
        self._trail: list[dict[tuple, list[int]]] = [{} for _ in range(B)]  # the trajectory
        self._learned = [0] * B  # output tokens already in the pool
        self.sweeps_forwarded = 0  # model calls of the last solve, the prompt's included
        self.tokens_forwarded = 0  # tokens fed to the model after the prompt (last solve)

    # --- the model, over the cache -------------------------------------------------------
    def _forward(self, tokens: Tensor) -> Tensor:
        """Feed tokens (B, n) after the cache; returns logits (B, n, V) (float32)."""
        past = 0 if self._cache is None else self._cache.get_seq_length()
        n = tokens.shape[1]
        mask = torch.cat([self.prompt_mask, torch.ones(self.B, past + n - self.P,
                          dtype=torch.long, device=self.device)], dim=1)  # fmt: skip
        mask = mask[:, : past + n]
        positions = (mask.cumsum(1) - 1).clamp(min=0)[:, past:]  # (B, n) per-item positions
        kwargs = {self._cache_arg: self._cache} if self._cache is not None else {}
        out = self.model(
            input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True, **kwargs
        )
        self._cache = _cache_of(out, self._cache_arg)
        self.sweeps_forwarded += 1
        return out.logits.float()

    def _prefill(self) -> None:
        self._cache = None
        logits = self._forward(self.prompt_ids)
        self._first_logits = logits[:, -1]  # (B, V): the logits of new position 0
        self._kv_tokens = torch.empty(self.B, 0, dtype=torch.long, device=self.device)
        self._pool = [{} for _ in range(self.B)]
        self._trail = [{} for _ in range(self.B)]
        self._learned = [0] * self.B
        for b in range(self.B):
            n = int(self.prompt_lengths[b])
            self._learn(self._pool[b], self.prompt_ids[b, self.P - n :].tolist())

    def _crop(self, keep: int) -> None:
        """Keep the prompt and the first `keep` new tokens' cache entries."""
        drop = self._cache.get_seq_length() - (self.P + keep)
        if drop > 0:
            self._cache.crop(-drop)  # a negative count removes entries (every transformers)
        self._kv_tokens = self._kv_tokens[:, :keep]

    def logits(self, x: Tensor, start: int, stop: int) -> Tensor:
        """The logits (B, n, V) of positions [start, stop) given the iterate's tokens x (B, T),
        from the cache where its entries still hold x's tokens."""
        if self._cache is None:
            self._prefill()
        tokens = x.long()
        kept = self._kv_tokens.shape[1]
        same = (self._kv_tokens == tokens[:, :kept]).all(0)  # entries still valid
        valid = int(same.int().cumprod(0).sum()) if kept else 0
        # positions [start, stop) need logits after tokens < start: feed from `first`
        first = min(valid, max(start - 1, 0))
        self._crop(first)
        if stop - 1 <= first:  # only position 0's logits are needed: the prefill's
            return self._first_logits[:, None]
        fed = tokens[:, first : stop - 1]  # (B, n'): logits of positions first + 1 .. stop - 1
        out = self._forward(fed)
        self._kv_tokens = torch.cat([self._kv_tokens, fed], dim=1)
        self.tokens_forwarded += fed.numel()
        if first == 0:
            out = torch.cat([self._first_logits[:, None], out], dim=1)  # position 0 first
            lo = start
        else:
            lo = start - (first + 1)
        return out[:, lo:]

    def _choose(self, logits: Tensor, x: Tensor, start: int, stop: int) -> Tensor:
        """Tokens (B, n) from logits (B, n, V): argmax of logits / temperature + Gumbel noise;
        after an EOS among the inputs, pad."""
        if self.temperature > 0:
            scores = logits / self.temperature + self.gumbel[:, start:stop].float()
        else:
            scores = logits
        tok = scores.argmax(-1)  # (B, n)
        if self.eos_id is not None:
            ended = torch.zeros(x.shape[0], stop, dtype=torch.bool, device=tok.device)
            ended[:, 1:] = (x.long()[:, : stop - 1] == self.eos_id).cumsum(1) > 0  # EOS before
            tok = torch.where(ended[:, start:stop], self.pad_id, tok)
        return tok

    # --- the problem protocol ------------------------------------------------------------
    def prepare(self) -> None:
        self._cache = None  # every solve starts from the prompt (weights may have changed)
        self.sweeps_forwarded = 0
        self.tokens_forwarded = 0

    def initial(self) -> Tensor:
        return torch.full((self.B, self.length), float(self.pad_id), device=self.device)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        tok = self._choose(self.logits(x, start, stop), x, start, stop)  # (B, n)
        if self.ngram:
            for b, row in enumerate(tok.tolist()):
                self._learn(self._trail[b], row)
        return tok.to(x.dtype)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        """The ordinary decoding loop with the KV cache: one token per model call."""

        def step(t: int) -> Tensor:
            if t == 0:
                self._prefill()
            return self.evaluate(x, t, t + 1)

        return step

    def guess(self, x: Tensor, window: Any, certified: Tensor) -> Tensor | None:
        """n-gram proposals after each item's last certified token (the lookahead pool)."""
        if not self.ngram or self._cache is None:
            return None
        start, stop = window.bounds()  # the pool lives on the host: so does the window
        window = x[:, start:stop].clone()
        changed = False
        rows = x.long().tolist()
        for b, c in enumerate(certified.tolist()):
            if c > self._learned[b]:  # newly certified output: verified text for the pool
                lo = max(0, self._learned[b] - self.ngram)
                head = [] if lo > 0 else self._prompt_tail(b)
                self._learn(self._pool[b], head + rows[b][lo:c])
                self._learned[b] = c
            if c >= stop or c < 1:
                continue
            seen = (self._prompt_tail(b) + rows[b][:c])[-2:]  # the last two final tokens
            keys = [tuple(seen), tuple(seen[-1:])]  # the longer context first
            follow = next((pool[k] for pool in (self._pool[b], self._trail[b]) for k in keys
                           if k in pool), None)  # fmt: skip
            if not follow:
                continue
            n = min(len(follow), stop - c)
            window[b, c - start : c - start + n] = torch.tensor(follow[:n], dtype=window.dtype)
            changed = True
        return window if changed else None

    def _prompt_tail(self, b: int) -> list[int]:
        """The last prompt tokens of item b (n-grams running from the prompt into the output)."""
        return self.prompt_ids[b, self.P - self.ngram :].tolist()

    def _learn(self, pool: dict[tuple, list[int]], tokens: list[int]) -> None:
        """Add the n-grams of a token sequence to a pool, keyed by the one and the two tokens
        before them (the latest wins)."""
        n = self.ngram
        for i in range(len(tokens) - 1):
            follow = tokens[i + 1 : i + n]
            pool[(tokens[i],)] = follow
            if i > 0:
                pool[(tokens[i - 1], tokens[i])] = follow

    def tokens(self, value: Tensor) -> list[list[int]]:
        """A solution's tokens per item, up to and including the first EOS."""
        out = []
        for row in value.long().tolist():
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
            out.append(row)
        return out


def _cache_argument(model: Any) -> str:
    """The forward's keyword for the KV cache: `cache` (newer transformers) or
    `past_key_values`."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(out: Any, name: str) -> Any:
    cache = getattr(out, name, None)
    if cache is None:
        cache = getattr(out, "past_key_values", None)
    if cache is None or not hasattr(cache, "crop") or not hasattr(cache, "get_seq_length"):
        raise ValueError(
            f"the model returned a cache of type {type(cache).__name__}, which cannot be cropped "
            "(LMDecoding needs a transformers DynamicCache)"
        )
    return cache
