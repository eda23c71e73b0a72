"""A transformers Llama-layout causal LM run over a static KV cache written by column.

`StaticKV(model, batch, columns, pad)` keeps one key and one value buffer per layer of fixed
capacity (`columns` positions of the left-padded sequence) and runs the model's own modules
(embedding, norms, projections, MLPs, rotary embedding, head) over any set of columns given as
a device tensor: the forward of n tokens writes their keys and values at their columns and
attends, per query, to every column at or before its own (after the item's left padding).
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
        shape = (batch, kv_heads, columns, attn.head_dim)
        self.keys = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.values = [torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in self.layers]
        self.B, self.L = batch, columns
        self.pad = pad.to(p.device)
        self.range = torch.arange(columns, device=p.device)
        with torch.no_grad():  # cos/sin of every position, gathered per token
            cos, sin = inner.rotary_emb(p.new_zeros(1), self.range[None])
        self.cos, self.sin = cos[0], sin[0]  # (L, D)

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
        pos = (columns[None, :] - self.pad[:, None]).clamp(min=0)  # (B, n) per-item positions
        cos, sin = self.cos[pos][:, None], self.sin[pos][:, None]  # (B, 1, n, D)
        # query column c sees key column j <= c after the padding (a padding column itself,
        # so that no row is empty: its output is never seen)
        before = self.range[None, None, :] <= columns[None, :, None]  # (1, n, L)
        real = self.range[None, None, :] >= self.pad[:, None, None]  # (B, 1, L)
        mask = (before & (real | (self.range[None, None, :] == columns[None, :, None])))[:, None]
        h = self.model.model.embed_tokens(tokens)
        for i, layer in enumerate(self.layers):
            h = h + self._attend(layer.self_attn, layer.input_layernorm(h), i, columns,
                                 cos, sin, mask)  # fmt: skip
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return self.model.lm_head(self.model.model.norm(h)).float()

    def _attend(self, attn, h, i, columns, cos, sin, mask) -> Tensor:
        B, n, _ = h.shape
        D = attn.head_dim
        q = attn.q_proj(h).view(B, n, -1, D).transpose(1, 2)  # (B, H, n, D)
        k = attn.k_proj(h).view(B, n, -1, D).transpose(1, 2)  # (B, Hkv, n, D)
        v = attn.v_proj(h).view(B, n, -1, D).transpose(1, 2)
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        keys, values = self.keys[i], self.values[i]
        keys.index_copy_(2, columns, k.to(keys.dtype))
        values.index_copy_(2, columns, v.to(values.dtype))
        heads, kv_heads = q.shape[1], keys.shape[1]
        if heads != kv_heads:  # grouped-query attention: each key head serves several
            shape = (B, kv_heads, heads // kv_heads, *keys.shape[2:])
            keys = keys[:, :, None].expand(shape).reshape(B, heads, *keys.shape[2:])
            values = values[:, :, None].expand(shape).reshape(B, heads, *values.shape[2:])
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=attn.scaling)
        return attn.o_proj(out.transpose(1, 2).reshape(B, n, -1))


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding (the half-split convention of transformers' Llama)."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
