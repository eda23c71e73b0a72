"""A transformers Llama-layout causal LM run over a static KV cache written by column.

`StaticKV(model, batch, columns, pad)` keeps one key and one value buffer per layer of fixed
capacity (`columns` positions of the left-padded sequence) and runs the model's own modules
(embedding, projections, MLPs, rotary embedding, head; its RMSNorms' weights through torch's
fused `rms_norm`) over any set of columns given as a device tensor: the forward of n tokens
writes their keys and values at their columns and attends, per query, to every column at or
before its own (after the item's left padding).
Nothing is read on the host and every shape is fixed by n, so a forward can be captured in a
CUDA graph and replayed with the columns moved on the device (a decoding window that slides
with the certified prefix).

Columns after a query's own are masked, whatever they hold; columns before it are trusted:
the caller keeps them written from the tokens it decodes after (a decoder re-feeds from the
first column whose token changed). Supported: the Llama layout (`llama`, and `mistral` and
`qwen2` without a sliding window), where an attention layer is q/k/v/o projections, rotary
embedding and softmax attention; `StaticKV.unsupported(model)` says why another is not.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["StaticKV"]

#: transformers model types whose decoder layers have the Llama layout
LAYOUTS = ("llama", "mistral", "qwen2")


class StaticKV:
    """Keys and values of `columns` positions for `batch` sequences, and the model over them.

    Args:
        model: a transformers causal LM of the Llama layout (see the module doc), in eval mode.
        batch: B, the sequences decoded together.
        columns: L, the capacity (prompt and new tokens, left-padded to one length).
        pad: (B,) long, the left padding of each sequence (its first real column).
    """

    def __init__(self, model: Any, batch: int, columns: int, pad: Tensor) -> None:
        why = self.unsupported(model, columns)
        if why:
            raise ValueError(f"a static KV cache cannot run this model: {why}")
        self.model = model
        inner = model.model
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        p = next(model.parameters())
        kv_heads = attn.k_proj.out_features // attn.head_dim
        self.kv_heads = kv_heads
        self.group = attn.q_proj.out_features // attn.head_dim // kv_heads
        shape = (batch, kv_heads, columns, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.B, self.L = batch, columns
        self.pad = pad.to(p.device)
        self.range = torch.arange(columns, device=p.device)
        with torch.no_grad():  # cos/sin of every position, gathered per token
            cos, sin = inner.rotary_emb(p.new_zeros(1), self.range[None])
        self.cos, self.sin = cos[0], sin[0]  # (L, D)
        # the q, k and v projections as one GEMM, and the MLP's gate and up projections:
        # fewer, larger GEMMs at a few rows (copies of the weights, refreshed by `bake`)
        self.qkv = [
            _Joined(layer.self_attn, ("q_proj", "k_proj", "v_proj")) for layer in self.layers
        ]
        self.gate_up = [_Joined(layer.mlp, ("gate_proj", "up_proj")) for layer in self.layers]

    def bake(self) -> None:
        """Copy the model's current weights into the joined projections (in place: captured
        graphs read them by address). Call after the weights change."""
        for joined in self.qkv + self.gate_up:
            joined.bake()

    @staticmethod
    def unsupported(model: Any, columns: int | None = None) -> str | None:
        """Why `model` cannot run over a static cache (None: it can)."""
        config = getattr(model, "config", None)
        kind = getattr(config, "model_type", None)
        if kind not in LAYOUTS:
            return f"model type {kind!r} is not one of the Llama layout's ({', '.join(LAYOUTS)})"
        inner = getattr(model, "model", None)
        needed = ("embed_tokens", "layers", "norm", "rotary_emb")
        if inner is None or not all(hasattr(inner, n) for n in needed):
            return "the model has no model.{embed_tokens,layers,norm,rotary_emb}"
        if not hasattr(model, "lm_head"):
            return "the model has no lm_head"
        window = getattr(config, "sliding_window", None)
        uses = getattr(config, "use_sliding_window", window is not None)
        if uses and window is not None and (columns is None or window < columns):
            return f"its attention has a sliding window ({window} positions)"
        return None

    def forward(self, tokens: Tensor, columns: Tensor) -> Tensor:
        """Logits (B, n, V), float32, of `tokens` (B, n) long fed at `columns` (n,) long
        (increasing, on the model's device); their keys and values are written there."""
        B, n = tokens.shape
        pos = (columns[None, :] - self.pad[:, None]).clamp(min=0)  # (B, n) per-item positions
        cos, sin = self.cos[pos][:, :, None], self.sin[pos][:, :, None]  # (B, n, 1, D)
        # query column c sees key column j <= c after the padding (a padding column itself,
        # so that no row is empty: its output is never seen); as a bias added to the scores
        # of every query head a key head serves: (B * key heads, group * n, L)
        before = self.range[None, None, :] <= columns[None, :, None]  # (1, n, L)
        real = self.range[None, None, :] >= self.pad[:, None, None]  # (B, 1, L)
        seen = before & (real | (self.range[None, None, :] == columns[None, :, None]))
        bias = torch.zeros(seen.shape, dtype=self.keys[0].dtype, device=seen.device)
        bias = bias.masked_fill_(~seen, float("-inf"))[:, None, None]  # (B, 1, 1, n, L)
        bias = bias.expand(B, self.kv_heads, self.group, n, self.L)
        bias = bias.reshape(B * self.kv_heads, self.group * n, self.L)
        h = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            x = _norm(layer.input_layernorm, h)
            h = h + self._attend(layer.self_attn, x, i, columns, cos, sin, bias)
            h = h + self._mlp(layer.mlp, _norm(layer.post_attention_layernorm, h), i)
        return self.model.lm_head(_norm(self.model.model.norm, h)).float()

    def _attend(self, attn, h, i, columns, cos, sin, bias) -> Tensor:
        """Grouped-query attention over the cache, written out (scores by one batched GEMM
        with the scale and the mask fused, softmax, one batched GEMM): at a few query tokens
        a third of the fused kernel's time on an H100 (benchmarks/profile_lm_kernels.py)."""
        B, n, _ = h.shape
        D, Hkv, g, L = attn.head_dim, self.kv_heads, self.group, self.L
        q, k, v = self.qkv[i](h)
        q, k, v = q.view(B, n, Hkv * g, D), k.view(B, n, Hkv, D), v.view(B, n, Hkv, D)
        qk = _rotate(torch.cat([q, k], dim=2), cos, sin)  # one rotation for both
        q, k = qk[:, :, : Hkv * g], qk[:, :, Hkv * g :]
        keys, values = self.keys[i], self.values[i]
        keys.index_copy_(2, columns, k.transpose(1, 2).to(keys.dtype))
        values.index_copy_(2, columns, v.transpose(1, 2).to(values.dtype))
        # query head kv * g + j reads key head kv (transformers' repeat_interleave order)
        qg = q.reshape(B, n, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B * Hkv, g * n, D)
        kt = keys.view(B * Hkv, L, D).transpose(1, 2)
        scores = torch.baddbmm(bias, qg.to(keys.dtype), kt, alpha=attn.scaling)
        out = torch.bmm(torch.softmax(scores, dim=-1), values.view(B * Hkv, L, D))
        out = out.view(B, Hkv, g, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, Hkv * g * D)
        return attn.o_proj(out.to(h.dtype))

    def _mlp(self, mlp, h, i) -> Tensor:
        """The gated MLP, down(act(gate(h)) * up(h)), with gate and up as one GEMM."""
        joined = self.gate_up[i]
        if not joined.ok or not hasattr(mlp, "act_fn") or not hasattr(mlp, "down_proj"):
            return mlp(h)
        gate, up = joined(h)
        return mlp.down_proj(mlp.act_fn(gate) * up)


class _Joined:
    """Linear layers of one input (`names` of `module`) as one GEMM over their stacked
    weights (and biases), split after; `ok` is False where they cannot be joined (missing,
    or biases on some only), and then each layer runs as itself."""

    def __init__(self, module: Any, names: tuple[str, ...]) -> None:
        self.layers = [getattr(module, n, None) for n in names]
        linear = all(isinstance(m, torch.nn.Linear) for m in self.layers)
        biased = {linear and m.bias is not None for m in self.layers}
        self.ok = linear and len(biased) == 1
        if not self.ok:
            return
        self.sizes = [m.out_features for m in self.layers]
        self.weight = torch.cat([m.weight.detach() for m in self.layers])
        self.bias = torch.cat([m.bias.detach() for m in self.layers]) if biased == {True} else None

    def bake(self) -> None:
        if not self.ok:
            return
        with torch.no_grad():
            torch.cat([m.weight for m in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([m.bias for m in self.layers], out=self.bias)

    def __call__(self, x: Tensor) -> tuple[Tensor, ...]:
        if not self.ok:
            return tuple(m(x) for m in self.layers)
        return F.linear(x, self.weight, self.bias).split(self.sizes, dim=-1)


def _norm(module: Any, x: Tensor) -> Tensor:
    """An RMSNorm module applied as torch's fused `rms_norm` (one kernel where transformers'
    formula runs six); any other norm as itself."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    weight = getattr(module, "weight", None)
    if "RMSNorm" not in type(module).__name__ or eps is None or weight is None:
        return module(x)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding (the half-split convention of transformers' Llama)."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
