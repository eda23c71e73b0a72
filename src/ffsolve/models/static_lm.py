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

from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F

__all__ = ["StaticKV"]

#: transformers model types whose decoder layers have the Llama layout
LAYOUTS = ("llama", "mistral", "qwen2")


class _Dims(NamedTuple):
    """The constants of a layer (the same for every layer of a model)."""

    head_dim: int
    kv_heads: int
    group: int  # query heads per key head
    eps: float  # the RMSNorms' epsilon
    scaling: float  # the attention scores' scale
    act: str  # the MLP's activation, a key of ACTS


class _Weights(NamedTuple):
    """One layer's weights as tensors (the joined projections are copies refreshed by
    `StaticKV.bake`; the others are the model's own parameters)."""

    in_norm: Tensor
    qkv: Tensor
    qkv_bias: Tensor | None
    o: Tensor
    o_bias: Tensor | None
    post_norm: Tensor
    gate_up: Tensor
    gate_up_bias: Tensor | None
    down: Tensor
    down_bias: Tensor | None


#: the MLP activations the layer function knows (transformers' `hidden_act` names)
ACTS = {
    "silu": F.silu,
    "swish": F.silu,
    "relu": F.relu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class StaticKV:
    """Keys and values of `columns` positions for `batch` sequences, and the model over them.

    Args:
        model: a transformers causal LM of the Llama layout (see the module doc), in eval mode.
        batch: B, the sequences decoded together.
        columns: L, the capacity (prompt and new tokens, left-padded to one length).
        pad: (B,) long, the left padding of each sequence (its first real column).
        compile: None, or a `torch.compile` backend ("inductor") for the layer function:
            compiled once per shape (batch, tokens per forward, capacity), shared by every
            layer and every StaticKV of those shapes; forwards of other widths than those
            given to `forward(..., compiled=True)` run it uncompiled.
    """

    def __init__(
        self, model: Any, batch: int, columns: int, pad: Tensor, compile: str | None = None
    ) -> None:
        why = self.unsupported(model, columns)
        if why:
            raise ValueError(f"a static KV cache cannot run this model: {why}")
        if compile is not None and not isinstance(compile, str):
            raise TypeError(
                f"compile must be None or a torch.compile backend name, got {compile!r}"
            )
        self.model = model
        inner = model.model
        self.layers = list(inner.layers[: model.config.num_hidden_layers])
        attn = self.layers[0].self_attn
        p = next(model.parameters())
        kv_heads = attn.k_proj.out_features // attn.head_dim
        group = attn.q_proj.out_features // attn.head_dim // kv_heads
        norm = self.layers[0].input_layernorm
        self.dims = _Dims(attn.head_dim, kv_heads, group, _eps(norm), float(attn.scaling),
                          model.config.hidden_act)  # fmt: skip
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
        self.weights = [
            _Weights(layer.input_layernorm.weight, qkv.weight, qkv.bias,
                     layer.self_attn.o_proj.weight, layer.self_attn.o_proj.bias,
                     layer.post_attention_layernorm.weight, gu.weight, gu.bias,
                     layer.mlp.down_proj.weight, layer.mlp.down_proj.bias)
            for layer, qkv, gu in zip(self.layers, self.qkv, self.gate_up, strict=True)
        ]  # fmt: skip
        self.backend = compile
        self.compiled = (
            _layer if compile is None
            else torch.compile(_layer, backend=compile, dynamic=False, fullgraph=True)
        )  # fmt: skip

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
        act = getattr(config, "hidden_act", None)
        if act not in ACTS:
            return f"its MLP activation {act!r} is not one of {', '.join(ACTS)}"
        for i, layer in enumerate(inner.layers[: config.num_hidden_layers]):
            attn, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            parts = {
                "q/k/v projections": [getattr(attn, n, None) for n in ("q_proj", "k_proj",
                                                                       "v_proj")],
                "o projection": [getattr(attn, "o_proj", None)],
                "gate/up projections": [getattr(mlp, n, None) for n in ("gate_proj", "up_proj")],
                "down projection": [getattr(mlp, "down_proj", None)],
            }  # fmt: skip
            for what, mods in parts.items():
                if not all(isinstance(m, torch.nn.Linear) for m in mods):
                    return f"layer {i}'s {what} are not torch Linear layers"
                if len({m.bias is None for m in mods}) != 1:
                    return f"layer {i}'s {what} have biases on some only"
            for name in ("input_layernorm", "post_attention_layernorm"):
                norm = getattr(layer, name, None)
                if "RMSNorm" not in type(norm).__name__ or _eps(norm) is None:
                    return f"layer {i}'s {name} is not an RMSNorm with a weight and an epsilon"
            if getattr(attn, "head_dim", None) is None or getattr(attn, "scaling", None) is None:
                return f"layer {i}'s attention has no head_dim or scaling"
        return None

    def forward(
        self, tokens: Tensor, columns: Tensor, compiled: bool = True, logits: bool = True
    ) -> Tensor | None:
        """Logits (B, n, V), float32, of `tokens` (B, n) long fed at `columns` (n,) long
        (increasing, on the model's device); their keys and values are written there.
        `compiled`: through the compiled layer function, if there is one (a prompt's prefill
        of a width used once asks for the plain one: no compilation); `logits=False`: only
        the keys and values (a prefill), no head, returns None."""
        B, n = tokens.shape
        Hkv, g = self.dims.kv_heads, self.dims.group
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
        bias = bias.expand(B, Hkv, g, n, self.L).reshape(B * Hkv, g * n, self.L)
        h = self.model.model.embed_tokens(tokens)
        if compiled and self.backend is not None:
            # each (batch, width, capacity) is one compilation: more than torch's default
            # limit of 8 may be in use (widths and batch sizes of a run), never silently eager
            with _more_compilations():
                h = self._layers(self.compiled, h, columns, cos, sin, bias)
        else:
            h = self._layers(_layer, h, columns, cos, sin, bias)
        if not logits:
            return None
        norm = self.model.model.norm
        return self.model.lm_head(F.rms_norm(h, (h.shape[-1],), norm.weight, _eps(norm))).float()

    def _layers(self, layer, h, columns, cos, sin, bias) -> Tensor:
        for i, w in enumerate(self.weights):
            h = layer(h, w, self.keys[i], self.values[i], columns, cos, sin, bias, self.dims)
        return h


def _more_compilations() -> Any:
    """A context in which one function may be compiled for 64 shapes (torch's limit is
    named recompile_limit, or cache_size_limit in older torch)."""
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{name: max(64, getattr(config, name))})


def _layer(
    h: Tensor,
    w: _Weights,
    keys: Tensor,
    values: Tensor,
    columns: Tensor,
    cos: Tensor,
    sin: Tensor,
    bias: Tensor,
    dims: _Dims,
) -> Tensor:
    """One decoder layer over the cache: h + attention(norm(h)), then + MLP(norm(h)); the
    keys and values of `columns` are written. Grouped-query attention is written out (scores
    by one batched GEMM with the scale and the mask fused, softmax, one batched GEMM): at a
    few query tokens a third of the fused kernel's time on an H100
    (benchmarks/profile_lm_kernels.py); RMSNorm is torch's fused `rms_norm`."""
    B, n, E = h.shape
    D, Hkv, g = dims.head_dim, dims.kv_heads, dims.group
    L = keys.shape[2]
    x = F.rms_norm(h, (E,), w.in_norm, dims.eps)
    q, k, v = F.linear(x, w.qkv, w.qkv_bias).split([Hkv * g * D, Hkv * D, Hkv * D], dim=-1)
    q, k, v = q.view(B, n, Hkv * g, D), k.view(B, n, Hkv, D), v.view(B, n, Hkv, D)
    qk = _rotate(torch.cat([q, k], dim=2), cos, sin)  # one rotation for both
    q, k = qk[:, :, : Hkv * g], qk[:, :, Hkv * g :]
    keys.index_copy_(2, columns, k.transpose(1, 2).to(keys.dtype))
    values.index_copy_(2, columns, v.transpose(1, 2).to(values.dtype))
    # query head kv * g + j reads key head kv (transformers' repeat_interleave order)
    qg = q.reshape(B, n, Hkv, g, D).permute(0, 2, 3, 1, 4).reshape(B * Hkv, g * n, D)
    kt = keys.view(B * Hkv, L, D).transpose(1, 2)
    scores = torch.baddbmm(bias, qg.to(keys.dtype), kt, alpha=dims.scaling)
    out = torch.bmm(torch.softmax(scores, dim=-1), values.view(B * Hkv, L, D))
    out = out.view(B, Hkv, g, n, D).permute(0, 3, 1, 2, 4).reshape(B, n, Hkv * g * D)
    h = h + F.linear(out.to(h.dtype), w.o, w.o_bias)
    x = F.rms_norm(h, (E,), w.post_norm, dims.eps)
    gate, up = F.linear(x, w.gate_up, w.gate_up_bias).chunk(2, dim=-1)
    return h + F.linear(ACTS[dims.act](gate) * up, w.down, w.down_bias)


class _Joined:
    """Linear layers of one input (`names` of `module`) as one GEMM over their stacked
    weights (and biases): copies, refreshed in place by `bake`."""

    def __init__(self, module: Any, names: tuple[str, ...]) -> None:
        self.layers = [getattr(module, n) for n in names]
        self.weight = torch.cat([m.weight.detach() for m in self.layers])
        biased = self.layers[0].bias is not None
        self.bias = torch.cat([m.bias.detach() for m in self.layers]) if biased else None

    def bake(self) -> None:
        with torch.no_grad():
            torch.cat([m.weight for m in self.layers], out=self.weight)
            if self.bias is not None:
                torch.cat([m.bias for m in self.layers], out=self.bias)


def _eps(norm: Any) -> float | None:
    """An RMSNorm module's epsilon (transformers names it `variance_epsilon` or `eps`)."""
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", None))
    return None if eps is None or getattr(norm, "weight", None) is None else float(eps)


def _rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """The rotary embedding (the half-split convention of transformers' Llama)."""
    half = x.shape[-1] // 2
    turned = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + turned * sin
