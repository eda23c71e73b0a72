"""PixelCNN++: a gated, down-shifted convolutional autoregressive model of images.

Salimans, Karpathy, Chen and Kingma, "PixelCNN++: Improving the PixelCNN with Discretized
Logistic Mixture Likelihood and Other Modifications" (ICLR 2017); the layout of the up and
down passes follows the public PyTorch port the paper's experiments were run on.

Causality comes from the shapes of the convolutions, not from masks: a "down-shifted" conv
(filter 2x3 over the current and the previous row, padded above and at the sides) sees only
rows above the current output once its output is shifted down by one row; a "down-right
shifted" conv (filter 2x2, padded above and to the left) sees rows above and pixels to the
left. The vertical stream `u` and the horizontal stream `ul` together see exactly the
pixels before (i, j) in raster order; the C channels of a pixel are coupled only through the
mixture's coefficients (channel c's location is shifted by the sampled channels < c).

Output: per pixel a mixture of M discretised logistics. Channel layout of the head (K
channels): M mixture logits, then C*M locations, C*M log-scales and C(C-1)/2*M coupling
coefficients (tanh), so K = M (1 + 2C + C(C-1)/2): 100 for RGB with M = 10, 30 for greyscale.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ffsolve.checkpoint import load_checkpoint, save_checkpoint
from ffsolve.errors import CheckpointError

__all__ = [
    "PixelCNNpp",
    "PixelCNNppConfig",
    "load_pixelcnnpp",
    "mixture_channels",
    "mixture_nll",
    "sample_mixture",
    "save_pixelcnnpp",
]

LOG_SCALE_MIN = -7.0  # floor of the logistic log-scale, as in the paper's code


@dataclass(frozen=True)
class PixelCNNppConfig:
    """Sizes of a PixelCNN++ (the paper: 5 resnets per stage, 160 filters for 32x32 RGB,
    40 for MNIST; 10 logistic mixture components; dropout 0.5).

    Attributes:
        channels: C, colour channels of the images (1 or 3).
        height, width: image size; both must be divisible by 4 (two stride-2 stages).
        filters: feature maps of every layer.
        resnets: gated resnet blocks per stage of the up pass (the down pass has
            resnets, resnets + 1, resnets + 1).
        mixtures: M, logistic mixture components per pixel.
        dropout: dropout rate inside the gated resnets (training only).
    """

    channels: int = 1
    height: int = 28
    width: int = 28
    filters: int = 40
    resnets: int = 5
    mixtures: int = 10
    dropout: float = 0.5

    def __post_init__(self) -> None:
        if self.channels < 1:
            raise ValueError(f"channels must be >= 1, got {self.channels}")
        for name in ("height", "width"):
            v = getattr(self, name)
            if v < 4 or v % 4:
                raise ValueError(f"{name} must be a positive multiple of 4, got {v}")
        for name in ("filters", "resnets", "mixtures"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")


def mixture_channels(channels: int, mixtures: int) -> int:
    """K, the head's channels: logits, locations, log-scales and coupling coefficients."""
    return mixtures * (1 + 2 * channels + channels * (channels - 1) // 2)


# --- weight-normalised layers --------------------------------------------------------------


class _WeightNorm(nn.Module):
    """w = g * v / ||v|| per output channel (Salimans and Kingma 2016).

    `freeze()` computes w once and keeps it (for sampling: the paper's code recomputed it in
    every call, which costs more than the convolution at small sizes); `train()` un-freezes.
    """

    out_dim: int = 0  # the weight's output-channel dimension

    def _init_wn(self, *shape: int) -> None:
        """Parameters v (`shape`, Kaiming-uniform), g = ||v|| per output channel, b = 0."""
        v = torch.empty(*shape)
        nn.init.kaiming_uniform_(v, a=math.sqrt(5))
        self.v = nn.Parameter(v)
        dims = [d for d in range(v.dim()) if d != self.out_dim]
        # (out,): w = v at initialisation
        self.g = nn.Parameter(torch.linalg.vector_norm(v.detach(), dim=dims))
        self.b = nn.Parameter(torch.zeros(v.shape[self.out_dim]))
        self._frozen: Tensor | None = None

    def weight(self) -> Tensor:
        return self._frozen if self._frozen is not None else self._normalised()

    def _normalised(self) -> Tensor:
        dims = [d for d in range(self.v.dim()) if d != self.out_dim]
        shape = [1] * self.v.dim()
        shape[self.out_dim] = -1
        return self.v * (self.g / torch.linalg.vector_norm(self.v, dim=dims)).view(shape)

    def freeze(self) -> None:
        """Compute w from the current v, g. A frozen weight is updated IN PLACE, never
        replaced: CUDA graphs captured earlier read it by address, and a replaced tensor would
        be freed and its memory reused under them."""
        with torch.no_grad():
            w = self._normalised()
            f = self._frozen
            if f is not None and (f.shape, f.dtype, f.device) == (w.shape, w.dtype, w.device):
                f.copy_(w)
            else:
                self._frozen = w.detach().clone()

    def train(self, mode: bool = True):  # noqa: D102  (un-freeze whenever training resumes)
        if mode:
            self._frozen = None
        return super().train(mode)

    def _apply(self, fn, recurse=True):  # keep a frozen weight on the module's device/dtype
        out = super()._apply(fn, recurse)
        if self._frozen is not None:
            self._frozen = fn(self._frozen)
        return out


class _Conv(_WeightNorm):
    """A weight-normalised conv with explicit causal padding (left, right, top, bottom)."""

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], stride: int, pad) -> None:
        super().__init__()
        self._init_wn(cout, cin, *kernel)
        self.stride = stride
        self.pad = pad

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pad), self.weight(), self.b, stride=self.stride)


def down_shifted_conv(cin: int, cout: int, kernel=(2, 3), stride: int = 1) -> _Conv:
    """Sees the current row and the kernel-1 rows above (centred horizontally)."""
    kh, kw = kernel
    return _Conv(cin, cout, kernel, stride, ((kw - 1) // 2, (kw - 1) // 2, kh - 1, 0))


def down_right_shifted_conv(cin: int, cout: int, kernel=(2, 2), stride: int = 1) -> _Conv:
    """Sees the current row and rows above, the current column and columns to the left."""
    kh, kw = kernel
    return _Conv(cin, cout, kernel, stride, (kw - 1, 0, kh - 1, 0))


class _Deconv(_WeightNorm):
    """A weight-normalised stride-2 transposed conv, cropped to keep causality."""

    out_dim = 1  # ConvTranspose2d weights are (in, out, kh, kw)

    def __init__(self, cin: int, cout: int, kernel: tuple[int, int], centred: bool) -> None:
        super().__init__()
        self._init_wn(cin, cout, *kernel)
        self.kernel = kernel
        self.centred = centred

    def forward(self, x: Tensor) -> Tensor:
        x = F.conv_transpose2d(x, self.weight(), self.b, stride=2, output_padding=1)
        kh, kw = self.kernel
        H, W = x.shape[2], x.shape[3]
        if self.centred:  # down-shifted: crop the bottom and both sides
            return x[:, :, : H - kh + 1, (kw - 1) // 2 : W - (kw - 1) // 2]
        return x[:, :, : H - kh + 1, : W - kw + 1]  # down-right: crop bottom and right


class _Nin(_WeightNorm):
    """A weight-normalised 1x1 layer (a linear map over channels at every pixel)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self._init_wn(cout, cin, 1, 1)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight(), self.b)


def concat_elu(x: Tensor) -> Tensor:
    """ELU of x and of -x, concatenated on channels: (B, C, H, W) -> (B, 2C, H, W)."""
    return F.elu(torch.cat([x, -x], dim=1))


def down_shift(x: Tensor) -> Tensor:
    """Move every row one down (the top row becomes zeros)."""
    return F.pad(x[:, :, :-1, :], (0, 0, 1, 0))


def right_shift(x: Tensor) -> Tensor:
    """Move every column one right (the left column becomes zeros)."""
    return F.pad(x[:, :, :, :-1], (1, 0, 0, 0))


class GatedResnet(nn.Module):
    """x + a * sigmoid(b), where (a, b) = conv(dropout(elu(conv(elu(x)) + nin(elu(skip)))))."""

    def __init__(self, filters: int, conv, skip: int, dropout: float) -> None:
        super().__init__()
        self.conv_in = conv(2 * filters, filters)
        self.nin_skip = _Nin(2 * skip * filters, filters) if skip else None
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_out = conv(2 * filters, 2 * filters)

    def forward(self, x: Tensor, skip: Tensor | None = None) -> Tensor:
        h = self.conv_in(concat_elu(x))  # (B, F, H, W)
        if self.nin_skip is not None:
            h = h + self.nin_skip(concat_elu(skip))
        h = self.conv_out(self.dropout(concat_elu(h)))  # (B, 2F, H, W)
        a, b = h.chunk(2, dim=1)
        return x + a * torch.sigmoid(b)


class PixelCNNpp(nn.Module):
    """PixelCNN++ mapping images (B, C, H, W) in [-1, 1] to mixture parameters (B, K, H, W).

    Output pixel (i, j) depends only on the pixels before (i, j) in raster order (all their
    channels) and on nothing of pixel (i, j) itself.

    Example:
        >>> net = PixelCNNpp(PixelCNNppConfig(channels=1, height=28, width=28, filters=40))
        >>> params = net(torch.zeros(16, 1, 28, 28))          # (16, 30, 28, 28)
    """

    def __init__(self, config: PixelCNNppConfig) -> None:
        super().__init__()
        self.config = config
        C, Fn, R, p = config.channels, config.filters, config.resnets, config.dropout
        ds, drs = down_shifted_conv, down_right_shifted_conv
        # the input gets one extra channel of ones, so that the zero padding of the causal
        # convolutions is distinguishable from black pixels at the border
        self.u_init = ds(C + 1, Fn, (2, 3))
        self.ul_init_down = ds(C + 1, Fn, (1, 3))
        self.ul_init_right = drs(C + 1, Fn, (2, 1))
        self.up_u = nn.ModuleList(
            nn.ModuleList(GatedResnet(Fn, ds, 0, p) for _ in range(R)) for _ in range(3)
        )
        self.up_ul = nn.ModuleList(
            nn.ModuleList(GatedResnet(Fn, drs, 1, p) for _ in range(R)) for _ in range(3)
        )
        self.down_u_size = nn.ModuleList(ds(Fn, Fn, (2, 3), stride=2) for _ in range(2))
        self.down_ul_size = nn.ModuleList(drs(Fn, Fn, (2, 2), stride=2) for _ in range(2))
        counts = [R, R + 1, R + 1]
        self.dn_u = nn.ModuleList(
            nn.ModuleList(GatedResnet(Fn, ds, 1, p) for _ in range(n)) for n in counts
        )
        self.dn_ul = nn.ModuleList(
            nn.ModuleList(GatedResnet(Fn, drs, 2, p) for _ in range(n)) for n in counts
        )
        self.up_u_size = nn.ModuleList(_Deconv(Fn, Fn, (2, 3), True) for _ in range(2))
        self.up_ul_size = nn.ModuleList(_Deconv(Fn, Fn, (2, 2), False) for _ in range(2))
        self.head = _Nin(Fn, mixture_channels(C, config.mixtures))

    def freeze_weight_norm(self) -> PixelCNNpp:
        """Compute every weight-normalised weight once (for sampling); undone by `train()`."""
        for m in self.modules():
            if isinstance(m, _WeightNorm):
                m.freeze()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """Mixture parameters (B, K, H, W) of every pixel given the pixels before it."""
        cfg = self.config
        if x.dim() != 4 or x.shape[1:] != (cfg.channels, cfg.height, cfg.width):
            raise ValueError(
                f"expected images (B, {cfg.channels}, {cfg.height}, {cfg.width}), "
                f"got {tuple(x.shape)}"
            )
        return self._net(x)

    def forward_top(self, x: Tensor) -> Tensor:
        """Mixture parameters (B, K, R, W) of the first R rows given those rows (B, C, R, W).

        Every layer is causal in rows (an output row reads input rows at or above it, through
        the strides too), so this equals `forward(full)[:, :, :R]` for any completion of the
        image below: the rows below are never computed. R must be a multiple of 4 (the two
        stride-2 stages) and at most the model's height. Equal to rounding, not bitwise: the
        convolution kernels depend on the shape (float64: ~1e-15; float32 on the CPU: up to
        ~1e-6 on the shipped checkpoints, bitwise for some R).
        """
        cfg = self.config
        R = x.shape[2] if x.dim() == 4 else -1
        if x.dim() != 4 or x.shape[1] != cfg.channels or x.shape[3] != cfg.width:
            raise ValueError(
                f"expected images (B, {cfg.channels}, R, {cfg.width}), got {tuple(x.shape)}"
            )
        if not 4 <= R <= cfg.height or R % 4:
            raise ValueError(f"R must be a multiple of 4 in [4, {cfg.height}], got {R}")
        return self._net(x)

    def _net(self, x: Tensor) -> Tensor:
        ones = torch.ones_like(x[:, :1])
        x = torch.cat([x, ones], dim=1)  # (B, C+1, H, W)
        us = [down_shift(self.u_init(x))]
        uls = [down_shift(self.ul_init_down(x)) + right_shift(self.ul_init_right(x))]
        for stage in range(3):
            for ru, rul in zip(self.up_u[stage], self.up_ul[stage], strict=True):
                us.append(ru(us[-1]))
                uls.append(rul(uls[-1], us[-1]))
            if stage < 2:  # (B, F, H/2^k, W/2^k)
                us.append(self.down_u_size[stage](us[-1]))
                uls.append(self.down_ul_size[stage](uls[-1]))
        u, ul = us.pop(), uls.pop()
        for stage in range(3):
            for ru, rul in zip(self.dn_u[stage], self.dn_ul[stage], strict=True):
                u = ru(u, us.pop())
                ul = rul(ul, torch.cat([u, uls.pop()], dim=1))
            if stage < 2:
                u = self.up_u_size[stage](u)
                ul = self.up_ul_size[stage](ul)
        return self.head(F.elu(ul))  # (B, K, H, W)


# --- the discretised logistic mixture ---------------------------------------------------


def _split(params: Tensor, channels: int, mixtures: int):
    """(B, K, H, W) -> logits (B, H, W, M), loc and log-scale (B, H, W, C, M), coeffs
    (B, H, W, C(C-1)/2, M) in tanh space."""
    C, M = channels, mixtures
    p = params.permute(0, 2, 3, 1)  # (B, H, W, K)
    logits = p[..., :M]
    loc = p[..., M : M + C * M].unflatten(-1, (C, M))
    log_scale = p[..., M + C * M : M + 2 * C * M].unflatten(-1, (C, M)).clamp(min=LOG_SCALE_MIN)
    n_coef = C * (C - 1) // 2
    coeffs = torch.tanh(p[..., M + 2 * C * M :].unflatten(-1, (n_coef, M)))
    return logits, loc, log_scale, coeffs


def _coupled(loc: Tensor, coeffs: Tensor, x: Tensor) -> Tensor:
    """Locations shifted by the previous channels: loc_c + sum_{c'<c} coef_{c,c'} x_{c'}.

    loc (..., C, M), coeffs (..., C(C-1)/2, M), x (..., C) -> (..., C, M)."""
    C = loc.shape[-2]
    out, k = [loc[..., 0, :]], 0
    for c in range(1, C):
        m = loc[..., c, :]
        for cp in range(c):
            m = m + coeffs[..., k, :] * x[..., cp, None]
            k += 1
        out.append(m)
    return torch.stack(out, dim=-2)


def mixture_nll(params: Tensor, x: Tensor, mixtures: int) -> Tensor:
    """Negative log-likelihood in nats of 8-bit images x (B, C, H, W) scaled to [-1, 1] under
    the discretised logistic mixture `params` (B, K, H, W); summed over pixels, (B,).

    Bins have width 2/255; the edge bins extend to -inf and +inf (Salimans et al. 2017, eq. 2).
    """
    C = x.shape[1]
    dt = torch.float64 if params.dtype == torch.float64 else torch.float32  # bf16 -> float32
    logits, loc, log_scale, coeffs = _split(params.to(dt), C, mixtures)
    xc = x.permute(0, 2, 3, 1).to(dt)  # (B, H, W, C)
    mean = _coupled(loc, coeffs, xc)  # (B, H, W, C, M)
    centred = xc[..., None] - mean
    inv_s = torch.exp(-log_scale)
    plus = inv_s * (centred + 1.0 / 255.0)
    minus = inv_s * (centred - 1.0 / 255.0)
    log_cdf_plus = plus - F.softplus(plus)  # log sigmoid(plus): the bottom edge bin
    log_one_minus_cdf_min = -F.softplus(minus)  # the top edge bin
    cdf_delta = torch.sigmoid(plus) - torch.sigmoid(minus)
    mid = inv_s * centred
    log_pdf_mid = mid - log_scale - 2.0 * F.softplus(mid)  # density at the bin centre
    # tiny bins (very sharp components): density x bin width instead of a cancelling difference
    inner = torch.where(
        cdf_delta > 1e-5,
        torch.log(cdf_delta.clamp(min=1e-12)),
        log_pdf_mid - math.log(127.5),
    )
    xe = xc[..., None]
    log_probs = torch.where(
        xe < -0.999, log_cdf_plus, torch.where(xe > 0.999, log_one_minus_cdf_min, inner)
    )  # (B, H, W, C, M)
    log_mix = log_probs.sum(-2) + torch.log_softmax(logits, dim=-1)  # (B, H, W, M)
    return -torch.logsumexp(log_mix, dim=-1).sum(dim=(1, 2))


def sample_mixture(params: Tensor, gumbel: Tensor, logistic: Tensor, mixtures: int) -> Tensor:
    """Pixels (B, H, W, C) in [-1, 1] from the mixture `params` (B, K, H, W), given noise.

    The component is the argmax of logits + Gumbel noise (B, H, W, M); channel c's value is
    clamp(mean_c + exp(log_scale_c) * logistic_c, -1, 1), where mean_c is shifted by the
    already sampled channels < c of the same pixel through the coefficients. No rounding to
    8 bits (as in the paper's sampler). Deterministic given the noise.
    """
    C = logistic.shape[-1]
    logits, loc, log_scale, coeffs = _split(params, C, mixtures)
    k = (logits + gumbel).argmax(dim=-1)  # (B, H, W)
    idx = k[..., None, None].expand(*k.shape, C, 1)  # (B, H, W, C, 1)
    m = loc.gather(-1, idx).squeeze(-1)  # (B, H, W, C)
    s = log_scale.gather(-1, idx).squeeze(-1)
    z = m + torch.exp(s) * logistic  # before coupling
    n_coef = C * (C - 1) // 2
    if n_coef:
        cf = coeffs.gather(-1, k[..., None, None].expand(*k.shape, n_coef, 1)).squeeze(-1)
    out, j = [], 0
    for c in range(C):
        v = z[..., c]
        for cp in range(c):
            v = v + cf[..., j] * out[cp]
            j += 1
        out.append(v.clamp(-1.0, 1.0))
    return torch.stack(out, dim=-1)  # (B, H, W, C)


# --- checkpoints ----------------------------------------------------------------------


def save_pixelcnnpp(
    path: str | Path,
    model: PixelCNNpp,
    extra: dict[str, Any] | None = None,
    storage_dtype: str = "float32",
) -> Path:
    """Save the weights (safetensors, float32 or float16) with the config and metadata (JSON).

    Weight-norm parameters are saved as trained (v, g, b); `load_pixelcnnpp` reads them back
    as float32 whatever the storage.
    """
    if storage_dtype not in ("float32", "float16"):
        raise ValueError(f"storage_dtype must be float32 or float16, got {storage_dtype!r}")
    dt = torch.float16 if storage_dtype == "float16" else torch.float32
    tensors = {k: v.detach().to(dt) for k, v in model.state_dict().items()}
    return save_checkpoint(
        path,
        "pixelcnnpp",
        tensors,
        dataclasses.asdict(model.config),
        {**(extra or {}), "storage_dtype": storage_dtype},
    )


def load_pixelcnnpp(
    path: str | Path, device: torch.device | str = "cpu", *, require: Sequence[str] = ()
) -> tuple[PixelCNNpp, dict[str, Any]]:
    """Load a PixelCNN++ checkpoint as float32 in eval mode; returns (model, metadata).

    `require`: sidecar fields the caller reads, e.g. ("data.name",) (see `check_sidecar`).
    """
    tensors, meta = load_checkpoint(path, "pixelcnnpp", device="cpu", require=require)
    try:
        model = PixelCNNpp(PixelCNNppConfig(**meta["config"]))
        model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)
    except (TypeError, KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(f"{path} does not match its PixelCNN++ config: {e}") from None
    return model.to(device).eval(), meta
