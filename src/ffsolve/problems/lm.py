"""Language-model decoding as a triangular system over the new tokens.

With the sampling noise drawn up front (Gumbel noise g_t per position), the continuation of a
prompt is token_t = argmax(logits_t / temperature + g_t) (greedy: temperature 0, no noise),
logits_t = LM(prompt, token_0..token_{t-1}): x_t = f_t(x_<t) over the T new tokens, solved by
every method; Jacobi decoding (Santilli et al. 2023) is Jacobi here, and the sliding window of
`gs_jacobi` is the window a Jacobi decoder keeps.

The KV cache holds the certified prefix: a sweep over the window [s, e) feeds the model the
tokens x_{s-1}..x_{e-2} only, after the cache of the prompt and x_0..x_{s-2}. Two caches:
`static` (Llama-layout models, `ffsolve.models.static_lm.StaticKV`) writes keys and values by
column into buffers of fixed capacity, so a window of fixed width whose start is a device
tensor runs with static shapes and no host read: the loop captures chunks of sweeps, and the
sequential loop whole, in CUDA graphs; `dynamic` (any causal LM) crops transformers' own
cache to the entries whose tokens are still those of the iterate.

`guess` proposes tokens for the uncertified positions from n-grams (lookahead decoding, Fu et
al. 2024, with prompt lookup), on the device: the latest earlier occurrence of the last
certified token, preferably with the token before it, in the prompt and the certified output,
else in the last sweep's predictions (the Jacobi trajectory); the tokens that followed it are
the proposal. The next sweep verifies the guess: the output is unchanged, only the number of
sweeps drops. `settled` ends an item as soon as its certified prefix holds EOS.

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

from ffsolve.models.static_lm import StaticKV
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
        cache: "static" (a KV cache of fixed capacity written by position, the window moved
            on the device: every sweep and the sequential loop can be captured in CUDA
            graphs; Llama-layout models, `StaticKV`), "dynamic" (transformers' own cache,
            cropped to the certified prefix; any causal LM, windows placed from the host),
            or "auto": static where the model allows it.
        compile: None, or a `torch.compile` backend ("inductor") for the static cache's
            layer function (`StaticKV`): compiled at the first solve of each window width
            (tens of seconds), then captured with the rest; the prompt's prefill runs it
            plain. Fewer, fused kernels: what a small model's forward costs on a GPU.
        capacity: the static cache's columns (at least the longest prompt plus `steps`, the
            default): give problems with prompts of several lengths one capacity, and a
            compiled layer function serves them all.

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
        cache: str = "auto",
        compile: str | None = None,
        capacity: int | None = None,
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
        if cache not in ("auto", "static", "dynamic"):
            raise ValueError(f"cache must be 'auto', 'static' or 'dynamic', got {cache!r}")
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
        self._ngram = 0
        self.ngram = ngram  # checked by the property
        self.B, self.P = B, longest
        ids = torch.full((B, longest), self.pad_id, dtype=torch.long)
        mask = torch.zeros(B, longest, dtype=torch.long)
        for b, prompt in enumerate(prompts):  # left padding: every prompt ends at column P - 1
            ids[b, longest - len(prompt) :] = torch.tensor(prompt)
            mask[b, longest - len(prompt) :] = 1
        self.prompt_ids, self.prompt_mask = ids.to(self.device), mask.to(self.device)
        self.prompt_lengths = self.prompt_mask.sum(1)  # (B,)
        # column c of the sequence: prompt columns 0..P-1, then new position t at P + t
        self.columns = torch.arange(longest + steps, device=self.device)
        if capacity is None:
            capacity = longest + steps
        if not _is_int(capacity) or capacity < longest + steps:
            raise ValueError(
                f"capacity must be an int >= the longest prompt plus steps ({longest + steps}), "
                f"got {capacity!r}"
            )
        self.capacity = int(capacity)
        why = StaticKV.unsupported(model, self.capacity)
        if cache == "static" and why:
            raise ValueError(f"cache='static' cannot run this model: {why}; use cache='dynamic'")
        self.cache = "static" if cache == "static" or (cache == "auto" and not why) else "dynamic"
        if compile is not None and (not isinstance(compile, str) or self.cache != "static"):
            raise ValueError(
                f"compile={compile!r}: a torch.compile backend name, for the static cache only "
                f"(this problem's cache is {self.cache})"
            )
        self.compile = compile
        static = self.cache == "static"
        # the static cache's work has static shapes and reads nothing on the host
        self.capturable = self.capturable_stepper = self.window_on_device = static
        self._kv: StaticKV | None = None  # the static cache (made at the first solve)
        self._fed: Tensor | None = None  # (B, P + T) the token each static column was fed
        self._cache_arg = _cache_argument(model)
        self._cache: Any = None  # the dynamic KV cache of the prompt and certified tokens
        self._kv_tokens = torch.empty(B, 0, dtype=torch.long, device=self.device)  # fed tokens
        self._first_logits: Tensor | None = None  # (B, V) the logits of position 0
        # counted on the host, so for eager solves only (a replayed CUDA graph adds nothing):
        self.sweeps_forwarded = 0  # model calls of the last solve, the prompt's included
        self.tokens_forwarded = 0  # tokens fed to the model after the prompt (last solve)

    @property
    def ngram(self) -> int:
        """The length of the n-grams `guess` proposes (0: none). Setting it drops the loops
        captured on this problem (they were recorded with the old guesses)."""
        return self._ngram

    @ngram.setter
    def ngram(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0 or value == 1:
            raise ValueError(f"ngram must be 0 (no guesses) or an int >= 2, got {value!r}")
        if value != self._ngram:
            self.graphs.invalidate()
        self._ngram = value

    # --- the token row and the choice of a token ------------------------------------------
    def _row(self, x: Tensor) -> Tensor:
        """(B, P + T) long: the prompt, then the iterate's tokens."""
        return torch.cat([self.prompt_ids, x.long()], dim=1)

    def _choose(self, logits: Tensor, x: Tensor, positions: Tensor) -> Tensor:
        """Tokens (B, n) at `positions` (n,) from their logits (B, n, V): the argmax of
        logits / temperature + Gumbel noise; after an EOS among the inputs, pad."""
        if self.temperature > 0:
            noise = self.gumbel.index_select(1, positions).float()
            scores = logits / self.temperature + noise
        else:
            scores = logits
        tok = scores.argmax(-1)  # (B, n)
        if self.eos_id is not None:
            seen = (x.long() == self.eos_id).cumsum(1)  # (B, T) EOS among positions <= t
            before = seen.index_select(1, (positions - 1).clamp(min=0)) > 0
            tok = torch.where(before & (positions > 0)[None], self.pad_id, tok)
        return tok

    # --- the static cache: columns written by position ------------------------------------
    def _static_prefill(self) -> None:
        """Make the static cache at the first solve, and write the prompt's columns but its
        last (every method feeds that one, as the input of new position 0)."""
        if self._kv is None:
            pad = self.P - self.prompt_lengths
            self._kv = StaticKV(self.model, self.B, self.capacity, pad, compile=self.compile)
            self._fed = torch.full((self.B, self.P + self.length), -1, device=self.device,
                                   dtype=torch.long)  # fmt: skip
        else:
            self._kv.bake()  # the weights may have changed since the last solve
        self._fed.fill_(-1)
        if self.P > 1:
            cols = self.columns[: self.P - 1]
            self._kv.forward(self.prompt_ids[:, : self.P - 1], cols, compiled=False, logits=False)
            self._fed[:, : self.P - 1] = self.prompt_ids[:, : self.P - 1]
        self.sweeps_forwarded = 1

    def _static_feed(self, tokens: Tensor, cols: Tensor, compiled: bool = True) -> Tensor:
        """Feed `tokens` (B, n) long at columns `cols` (n,): logits (B, n, V) of the
        positions cols - P + 1 (`compiled`: through the compiled layer function if any; a
        width that varies from sweep to sweep asks for the plain one)."""
        self._fed.index_copy_(1, cols, tokens)
        self.sweeps_forwarded += 1
        self.tokens_forwarded += tokens.numel()
        return self._kv.forward(tokens, cols, compiled=compiled)

    def _static_logits(self, x: Tensor, start: int, stop: int) -> Tensor:
        """Logits (B, n, V) of positions [start, stop) (host ints), re-feeding from the first
        column whose cached token is no longer the iterate's (a host read where start > 0;
        those widths vary, so only a window from position 0 runs the compiled layers)."""
        row, first = self._row(x), self.P + start - 1
        if start > 0:
            same = (self._fed[:, :first] == row[:, :first]).all(0)
            first = int(same.long().cumprod(0).sum())
        cols = self.columns[first : self.P + stop - 1]
        out = self._static_feed(row[:, first : self.P + stop - 1], cols, compiled=start == 0)
        return out[:, out.shape[1] - (stop - start) :]

    # --- the dynamic cache: transformers' own, cropped -----------------------------------
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

    def _crop(self, keep: int) -> None:
        """Keep the prompt and the first `keep` new tokens' cache entries."""
        drop = self._cache.get_seq_length() - (self.P + keep)
        if drop > 0:
            self._cache.crop(-drop)  # a negative count removes entries (every transformers)
        self._kv_tokens = self._kv_tokens[:, :keep]

    def _dynamic_logits(self, x: Tensor, start: int, stop: int) -> Tensor:
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

    def logits(self, x: Tensor, start: int, stop: int) -> Tensor:
        """The logits (B, n, V) of positions [start, stop) given the iterate's tokens x (B, T),
        from the cache where its entries still hold x's tokens (call `prepare()` first)."""
        if self.cache == "static":
            if self._kv is None:
                self._static_prefill()
            return self._static_logits(x, start, stop)
        return self._dynamic_logits(x, start, stop)

    # --- the problem protocol ------------------------------------------------------------
    def prepare(self) -> None:
        """Every solve starts from the prompt (weights may have changed): the static cache
        writes the prompt's columns here, the dynamic one at the first evaluation."""
        self._cache = None
        self.sweeps_forwarded = 0
        self.tokens_forwarded = 0
        if self.cache == "static":
            self._static_prefill()

    def initial(self) -> Tensor:
        return torch.full((self.B, self.length), float(self.pad_id), device=self.device)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        positions = self.columns[start:stop]
        return self._choose(self.logits(x, start, stop), x, positions).to(x.dtype)

    def evaluate_window(self, x: Tensor, start: Tensor, width: int) -> Tensor:
        """The window [start, start + width) with `start` on the device (static cache: the
        window's columns are gathered on the device; the columns before it hold the
        certified prefix, which the loop's window never starts after)."""
        if self.cache != "static":
            return super().evaluate_window(x, start, width)
        cols = self.columns[:width] + (start + self.P - 1)  # the window's inputs' columns
        logits = self._static_feed(self._row(x).index_select(1, cols), cols)
        return self._choose(logits, x, cols - (self.P - 1)).to(x.dtype)

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        """The ordinary decoding loop with the KV cache: one token per model call (static
        cache: step t feeds column P + t - 1, fixed at capture, so the loop replays)."""
        if self.cache == "static":
            last = self.prompt_ids[:, -1:]  # the input of position 0

            def step(t: int) -> Tensor:
                col = self.columns[self.P + t - 1 : self.P + t]
                logits = self._static_feed(last if t == 0 else x[:, t - 1 : t].long(), col)
                return self._choose(logits, x, self.columns[t : t + 1]).to(x.dtype)

            return step

        def dynamic_step(t: int) -> Tensor:
            if t == 0:
                self._prefill()
            return self.evaluate(x, t, t + 1)

        return dynamic_step

    def guess(self, x: Tensor, window: Any, certified: Tensor) -> Tensor | None:
        """n-gram proposals after each item's last certified token (lookahead decoding with
        prompt lookup), on the device: the latest earlier occurrence of that token (and of
        the one before it, preferred) in the prompt and certified output, else in the
        iterate's uncertified part (the last sweep's predictions); the ngram - 1 tokens that
        followed it are proposed for the positions after the certified prefix."""
        if not self.ngram:
            return None
        row, P, L = self._row(x), self.P, self.P + self.length
        key = (P + certified - 1)[:, None]  # (B, 1) the column of the last certified token
        last = row.gather(1, key)
        before = torch.where(key > 0, row.gather(1, (key - 1).clamp(min=0)), -1)
        prev = torch.cat([row.new_full((self.B, 1), -2), row[:, :-1]], dim=1)
        one = row == last  # (B, L): occurrences of the last token
        two = one & (prev == before)  # ... after the token before it
        cols = self.columns[None]
        older = cols < key  # the prompt and the certified output
        later = (cols > key) & (cols < L - 1)  # the predictions, with a token after them
        rank = one.long() * (1 + two.long()) * (1 + 2 * older.long()) * (older | later).long()
        best = (rank * L + cols).amax(1)  # (B,) older two > older one > later two > one
        found, match = best >= L, best % L
        j = window.positions()[None] - certified[:, None]  # (B, n) steps after the prefix
        src = match[:, None] + 1 + j
        use = found[:, None] & (j >= 0) & (j < self.ngram - 1) & (src < L)
        proposal = row.gather(1, src.clamp(0, L - 1)).to(x.dtype)
        return torch.where(use, proposal, window.take(x))

    def settled(self, x: Tensor, certified: Tensor) -> Tensor | None:
        """An item whose certified prefix holds EOS and whose later positions all hold the
        pad token is final whole (the decoding loop pads after EOS): T, else `certified`."""
        if self.eos_id is None:
            return None
        tok = x.long()
        done = self.columns[None, : self.length] < certified[:, None]  # (B, T)
        ended = ((tok == self.eos_id) & done).any(1)
        padded = ((tok == self.pad_id) | done).all(1)
        return torch.where(ended & padded, self.length, certified)

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
