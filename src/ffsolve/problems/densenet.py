"""The dense layers of a DenseNet as one triangular system (Song et al. 2021, Sec. 4.1).

Positions are the T dense layers in network order (98 for DenseNet-201); position t holds
layer t's new feature maps (k channels). Layer t of block b reads the block input (the stem
output for b = 0, else transition b-1 of the previous block's concatenated features) and the
earlier layers of its block; the transition reads only earlier positions, so
x_t = f_t(x_<t) holds with the transitions (and the stem, which reads only the image)
recomputed inside f from the current iterate, as in the paper. The logits are `head` of the
final iterate.

State representation: ONE padded state (B, T, F) with F = k * H_1 * W_1, the size of a
first-block layer; a layer of block b stores its (k, H_b, W_b) maps flattened in the first
k H_b W_b entries, the rest stay exactly zero. Why not per-block solves chained one after
another: that fixes the order "block 1 to convergence, then block 2", i.e. it can only
express gs_jacobi with blocks = dense blocks, while the paper's Jacobi updates all layers
of all blocks at once. With one state every core method (sequential, jacobi, jacobi_gs,
gs_jacobi with any block size or window, e.g. block_size = a dense block) iterates the whole
network unchanged. The price is memory: T * k * H_1 * W_1 values per image (DenseNet-201 at
224x224: 98 * 32 * 56 * 56 = 9.8M, 39 MB in float32), the same order as the activations of
one forward pass; padding entries never change, so they never delay the certificate.

Two sweeps of a dense block (both eval mode only; BatchNorm uses its running statistics):
- `fused=False`, the per-layer loop: each layer as in the model's forward (same modules,
  same concatenation), so sequential and Jacobi reproduce `model(x)` bitwise.
- `fused=True`, all layers of a block at once: BN1 folded into a per-layer affine over the
  block's full concatenated features (zero beyond the layer's own input channels, so later
  channels are multiplied by exactly zero), the L bottleneck 1x1 convs as ONE batched matrix
  product (L, 4k, C) @ (L, C, B HW), BN2 folded into a per-channel affine, and the L 3x3
  convs as ONE grouped convolution (groups = L), or (`conv3x3="unfold"`) as one im2col and
  one batched GEMM (L, k, 9 4k) @ (B, L, 9 4k, HW). It is a different float program (folded
  BN, different kernels), so it equals the per-layer loop to rounding, not bitwise; every
  method run with it returns that program's exact fixed point.

Example:
    >>> problem = DenseNetLayers(net.eval(), images, fused=True)
    >>> sol = ffsolve.solve(problem, method="jacobi")
    >>> logits = problem.logits(sol.value)          # == net(images) to rounding
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.models.densenet import DenseNet
from ffsolve.problems.base import Problem

__all__ = ["DenseNetLayers", "FusedBlock", "prediction_metrics", "stable_from"]


def _bn_affine(bn: torch.nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """Eval-mode BatchNorm as y = x * scale + shift, each (C,)."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


@dataclass
class FusedBlock:
    """The stacked parameters of one dense block's L layers, for the fused sweep.

    Attributes:
        scale1, shift1: (L, C, 1) folded BN1, zero beyond each layer's c0 + l k inputs.
        w1: (L, 4k, C) bottleneck 1x1 weights, zero-padded like scale1.
        scale2, shift2: (1, L 4k, 1, 1) folded BN2.
        w2: (L k, 4k, 3, 3) the 3x3 weights of all layers, one grouped conv.
    """

    scale1: Tensor
    shift1: Tensor
    w1: Tensor
    scale2: Tensor
    shift2: Tensor
    w2: Tensor
    num_layers: int
    growth: int
    conv3x3: str = "grouped"  # or "unfold": im2col + one batched GEMM

    @classmethod
    @torch.no_grad()  # folded constants of an eval-mode block, not part of any graph
    def of(cls, block, c0: int, growth: int, conv3x3: str = "grouped") -> FusedBlock:
        if conv3x3 not in ("grouped", "unfold"):
            raise ValueError(f"conv3x3 must be 'grouped' or 'unfold', got {conv3x3!r}")
        layers = list(block.values())
        L = len(layers)
        C = c0 + L * growth  # every channel of the block's concatenated output
        p = layers[0].conv1.weight
        bott = p.shape[0]
        scale1 = p.new_zeros(L, C, 1)
        shift1 = p.new_zeros(L, C, 1)
        w1 = p.new_zeros(L, bott, C)
        scale2, shift2 = [], []
        for i, layer in enumerate(layers):
            c = c0 + i * growth
            s, b = _bn_affine(layer.norm1)
            scale1[i, :c, 0], shift1[i, :c, 0] = s, b
            w1[i, :, :c] = layer.conv1.weight[:, :, 0, 0]
            s, b = _bn_affine(layer.norm2)
            scale2.append(s)
            shift2.append(b)
        w2 = torch.cat([layer.conv2.weight for layer in layers], 0)  # (L k, 4k, 3, 3)
        return cls(
            scale1, shift1, w1,
            torch.cat(scale2).view(1, -1, 1, 1), torch.cat(shift2).view(1, -1, 1, 1),
            w2, L, growth, conv3x3,
        )  # fmt: skip

    def sweep(self, feats: Tensor, lo: int = 0, hi: int | None = None) -> Tensor:
        """Layers [lo, hi) of the block, all from the same concatenated features.

        Args:
            feats: (B, C, H, W) the block input and the current layer outputs, concatenated.

        Returns:
            (B, (hi - lo) k, H, W): each layer's new maps, layer order.
        """
        hi = self.num_layers if hi is None else hi
        n, k = hi - lo, self.growth
        B, C, H, W = feats.shape
        bott = self.w1.shape[1]
        # the batch goes into the GEMM's N dimension, so the weights are never expanded B times
        x = feats.reshape(B, C, H * W).transpose(0, 1).reshape(1, C, B * H * W)  # (1, C, BHW)
        y = torch.relu(x * self.scale1[lo:hi] + self.shift1[lo:hi])  # (n, C, BHW)
        z = torch.bmm(self.w1[lo:hi], y)  # (n, 4k, BHW): one batched GEMM for n layers
        z = z.view(n * bott, B, H, W).transpose(0, 1)  # (B, n 4k, H, W), layer-major channels
        sl = slice(lo * bott, hi * bott)
        z = torch.relu(z * self.scale2[:, sl] + self.shift2[:, sl])
        w2 = self.w2[lo * k : hi * k]  # (n k, 4k, 3, 3)
        if self.conv3x3 == "grouped":
            return F.conv2d(z, w2, padding=1, groups=n)  # (B, n k, H, W)
        cols = F.unfold(z, 3, padding=1).view(B, n, bott * 9, H * W)  # (B, n, 4k 9, HW)
        out = torch.matmul(w2.reshape(n, k, bott * 9), cols)  # (B, n, k, HW)
        return out.view(B, n * k, H, W)


class DenseNetLayers(Problem):
    """A DenseNet's dense layers given fixed images, as x_t = f_t(x_<t) over the T layers.

    Args:
        model: a `DenseNet` in eval mode (its device and dtype are used).
        images: (B, C_in, H, W).
        fused: sweep each dense block with `FusedBlock` (one batched GEMM and one grouped
            conv per block) instead of the per-layer loop.
        conv3x3: the fused sweep's 3x3 convolutions: "grouped" (one grouped conv) or
            "unfold" (im2col + one batched GEMM).

    The state is (B, T, F), F = k * H_1 * W_1 (see the module docstring). The stem's output
    is a buffer the sweeps read: `set_images` computes it for new images of the same shape
    in place, so a captured loop replays on them.
    """

    dim = 1
    capturable = True  # static shapes, no host reads: the loop may capture its sweeps

    def __init__(
        self, model: DenseNet, images: Tensor, fused: bool = False, conv3x3: str = "grouped"
    ) -> None:
        if model.training:
            raise ValueError(
                "DenseNetLayers needs the model in eval mode (BatchNorm running stats)"
            )
        p = next(model.parameters())
        if images.dim() != 4 or images.shape[1] != model.config.in_channels:
            raise ValueError(
                f"images must be (B, {model.config.in_channels}, H, W), got {tuple(images.shape)}"
            )
        if images.device != p.device or images.dtype != p.dtype:
            raise ValueError(f"images are {images.dtype} on {images.device}, the model {p.dtype}")
        self.model = model
        self.fused = fused
        self.k = model.config.growth_rate
        self.blocks = model.dense_blocks()
        self.trans = model.transitions()
        self.sizes = list(model.config.block_config)
        self.offsets = [sum(self.sizes[:b]) for b in range(len(self.sizes) + 1)]  # block starts
        self.length = self.offsets[-1]
        with torch.no_grad():  # inference only: the problem is for evaluation, not training
            self.stem_out = model.stem(images)  # (B, c0, H1, W1): reads only the image
        B, _, H, W = self.stem_out.shape
        self.spatial = [(H, W)]
        for _ in self.trans:
            H, W = H // 2, W // 2
            self.spatial.append((H, W))
        self.F = self.k * self.spatial[0][0] * self.spatial[0][1]
        self.B = B
        self._fused = (
            [
                FusedBlock.of(b, c, self.k, conv3x3)
                for b, c in zip(self.blocks, model.block_inputs, strict=True)
            ]
            if fused
            else None
        )

    def set_images(self, images: Tensor) -> None:
        """New input images (same shape as the first): the stem (part of the forward) runs
        now, its output written into the buffer every sweep reads."""
        with torch.no_grad():
            self.stem_out.copy_(self.model.stem(images))

    # --- state <-> feature maps ------------------------------------------------------------
    def block_of(self, t: int) -> int:
        for b in range(len(self.sizes)):
            if t < self.offsets[b + 1]:
                return b
        raise IndexError(t)

    def layer_maps(self, x: Tensor, b: int, lo: int = 0, hi: int | None = None) -> Tensor:
        """Layers [lo, hi) of block b from the state, (B, (hi - lo) k, H_b, W_b)."""
        hi = self.sizes[b] if hi is None else hi
        H, W = self.spatial[b]
        t0 = self.offsets[b]
        v = x[:, t0 + lo : t0 + hi, : self.k * H * W]  # (B, n, k H W)
        return v.reshape(self.B, (hi - lo) * self.k, H, W)

    def block_features(self, x: Tensor, b: int, inp: Tensor) -> Tensor:
        """(B, c0 + L k, H_b, W_b): block b's input and all its layers from the state."""
        return torch.cat([inp, self.layer_maps(x, b)], 1)

    def block_input(self, x: Tensor, b: int, prev: Tensor | None = None) -> Tensor:
        """Input of block b from the state; `prev` = input of block b - 1 when known."""
        if b == 0:
            return self.stem_out
        if prev is None:
            prev = self.block_input(x, b - 1)
        return self.trans[b - 1](self.block_features(x, b - 1, prev))

    def _pack(self, out: Tensor, i: int, maps: Tensor) -> None:
        """Write (B, n k, H, W) maps into positions i.. of out (B, n_out, F)."""
        n = maps.shape[1] // self.k
        out[:, i : i + n, : maps[0].numel() // n] = maps.reshape(self.B, n, -1)

    # --- the Problem protocol --------------------------------------------------------------
    def initial(self) -> Tensor:
        return self.stem_out.new_zeros(self.B, self.length, self.F)

    def evaluate(self, x: Tensor, start: int, stop: int) -> Tensor:
        out = x.new_zeros(self.B, stop - start, self.F)
        inp = None
        for b in range(len(self.sizes)):
            t0, t1 = self.offsets[b], self.offsets[b + 1]
            if t0 >= stop:
                break
            inp = self.block_input(x, b, inp)  # transitions from the current iterate
            lo, hi = max(start, t0) - t0, min(stop, t1) - t0
            if lo >= hi:
                continue
            feats = self.block_features(x, b, inp)  # (B, c0 + L k, H, W)
            if self._fused is not None:
                self._pack(out, t0 + lo - start, self._fused[b].sweep(feats, lo, hi))
                continue
            c0 = inp.shape[1]
            for j, layer in enumerate(list(self.blocks[b].values())[lo:hi], start=lo):
                new = layer(feats[:, : c0 + j * self.k].contiguous())  # (B, k, H, W)
                self._pack(out, t0 + j - start, new)
        return out

    def stepper(self, x: Tensor) -> Callable[[int], Tensor]:
        """The ordinary forward, layer by layer, keeping each block's input (no recomputed
        transitions): with the per-layer sweep it runs the model's own kernels."""
        cache: dict[int, Tensor] = {}

        def step(t: int) -> Tensor:
            b = self.block_of(t)
            if b not in cache:
                cache[b] = self.block_input(x, b, cache.get(b - 1))
            j = t - self.offsets[b]
            feats = torch.cat([cache[b], self.layer_maps(x, b, 0, j)], 1)
            out = x.new_zeros(self.B, 1, self.F)
            if self._fused is not None:
                self._pack(out, 0, self._fused[b].sweep(feats_pad(feats, self, b), j, j + 1))
            else:
                self._pack(out, 0, list(self.blocks[b].values())[j](feats))
            return out

        return step

    # --- readout -----------------------------------------------------------------------------
    def logits(self, x: Tensor) -> Tensor:
        """(B, num_classes) logits of an iterate: last block's features through the head."""
        inp = None
        for b in range(len(self.sizes)):
            inp = self.block_input(x, b, inp)
        return self.model.head(self.block_features(x, len(self.sizes) - 1, inp))


def feats_pad(feats: Tensor, problem: DenseNetLayers, b: int) -> Tensor:
    """Zero-pad a block's partial concatenation to its full channel count (for FusedBlock)."""
    full = problem.model.block_inputs[b] + problem.sizes[b] * problem.k
    return F.pad(feats, (0, 0, 0, 0, 0, full - feats.shape[1]))


def prediction_metrics(
    logits: Tensor, reference: Tensor, previous: Tensor | None
) -> dict[str, Any]:
    """Per-iteration agreement of logits (B, K) with the sequential `reference` (B, K).

    Top-5 means the five LARGEST logits (the original code sorted ascending and compared the
    five smallest).

    Returns:
        top1_agree: fraction of images whose argmax equals the reference's.
        top5_agree: mean over images of |top5 & top5_ref| / 5 (as sets).
        top5_exact: fraction of images whose ordered top-5 equals the reference's.
        logit_l2: mean over images of ||logits - reference||_2.
        logit_diff: mean over images of ||logits - previous||_2 (None at the first).
        top1: the argmax per image (for the stability iteration).
    """
    kk = min(5, logits.shape[1])
    top = logits.topk(kk, 1).indices  # (B, 5), largest first
    ref = reference.topk(kk, 1).indices
    overlap = (top[:, :, None] == ref[:, None, :]).any(2).double().sum(1) / kk  # (B,)
    return {
        "top1_agree": float((top[:, 0] == ref[:, 0]).float().mean()),
        "top5_agree": float(overlap.mean()),
        "top5_exact": float((top == ref).all(1).float().mean()),
        "logit_l2": float((logits - reference).double().norm(dim=1).mean()),
        "logit_diff": None
        if previous is None
        else float((logits - previous).double().norm(dim=1).mean()),
        "top1": top[:, 0].tolist(),
    }


def stable_from(predictions: list[list[int]]) -> int:
    """The first iteration (1-based) from which every image's predicted class stays the
    final one, given the per-iteration predictions (iteration 1 first)."""
    last = predictions[-1]
    k = len(predictions)
    while k > 0 and predictions[k - 1] == last:
        k -= 1
    return k + 1
