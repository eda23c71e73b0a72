"""Row caches of a PixelCNN++: its forward recomputed on a few rows per level.

Fast PixelCNN++ generation (Ramachandran et al. 2017) keeps every layer's past outputs and
runs each layer only on what changed. Here every intermediate map of the network (each
gated resnet's output and inner map, the stride-2 convs, the transposed convs) is a cache
(N, C, H_l, W_l) at its level l (resolution H / 2^l), and one pass recomputes a range of
rows at each level from the cached rows above, reading only the input rows its kernels need
(the zero rows of the causal padding are added exactly as in the full layer).

Which maps can change. Every value of the vertical stream `u` at level l, row r, depends only
on image rows < 2^l r; every value of the horizontal stream `ul` there, on image rows
<= 2^l r (both through the strides and the transposed convs). So after a pixel of image row c
changes, stream s at level l, row r, must be recomputed iff c <= maxrow(s, l, r), and is
final otherwise. For the sequential loop at pixel (i, j) this recomputes, per level, the one
row holding i and only the streams that can see the last written pixel: at level 0 the `ul`
layers on every step and the `u` layers once per row; at levels 1 and 2 the `ul` layers on
every 2nd / 4th step of the first row of their span (`needed_now`: the columns pixel j
reads cannot have changed in between) and once more when the span's next row starts. Nothing
is ever computed below the current row, and columns right of the ones the current pixel
reads may be stale until their turn.

The same pass runs on local windows (a few rows per level around an image row, gathered from
a full pass) for a batch of rows at once: that is the Jacobi-GS row sweep of
`PixelCNNSampling.block_sweep`.

Exactness: every op is the full layer's op on a crop of its input, so the results agree with
the full forward to rounding (float64: ~1e-15); whether float32 is bitwise depends on the
convolution kernels chosen for the two shapes (on the CPU they often are not).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from ffsolve.models.pixelcnnpp import (
    GatedResnet,
    PixelCNNpp,
    _Conv,
    _Deconv,
    concat_elu,
)

__all__ = ["LEVELS", "conv_rows", "deconv_rows", "max_row", "needed_now", "row_pass"]

LEVELS = 3  # resolutions H, H/2, H/4


def max_row(stream: str, level: int, row: int) -> int:
    """The last image row a value of `stream` ('u' or 'ul') at (level, row) depends on."""
    return (row << level) - (1 if stream == "u" else 0)


def needed_now(level: int, j: int) -> bool:
    """Whether `ul` at `level` must be recomputed for pixel column j after pixel j - 1 of
    the same image row (the first row of the level's row span) was written.

    A `ul` value at (level, row r, column c) depends on the pixels before (2^l r, 2^l c), and
    pixel j reads `ul` at this level only in columns <= j >> l. Pixel j - 1 reaches columns
    c > (j - 1) / 2^l, so a needed column changed only when 2^l divides j; otherwise the
    columns computed at an earlier step of this row are current (the columns to their right
    are stale until their turn, and nothing reads them).
    """
    return j % (1 << level) == 0


def conv_rows(layer: _Conv, src: Tensor, r0: int, r1: int, pre=None) -> Tensor:
    """Output rows [r0, r1) of the causal conv `layer` applied to `pre(src)`.

    Reads only the input rows those outputs need; rows above the map (and below, for a
    bottom padding) are the layer's zero padding. `pre` (pointwise, e.g. concat_elu) is
    applied to the crop before padding, as the full layer pads its input.

    Args:
        src: (N, Cin, Hs, Ws), the layer's input map (pre not yet applied).

    Returns:
        (N, Cout, r1 - r0, Wout).
    """
    left, right, top, _ = layer.pad
    kh, s = layer.v.shape[2], layer.stride
    lo, hi = s * r0 - top, s * (r1 - 1) - top + kh  # input rows, in unpadded coordinates
    a, b = max(lo, 0), min(hi, src.shape[2])
    crop = src[:, :, a:b]
    if pre is not None:
        crop = pre(crop)
    top_pad, bottom_pad = a - lo, hi - b
    if top_pad < bottom_pad or left < right:  # not this model's layers: pad explicitly
        return F.conv2d(
            F.pad(crop, (left, right, top_pad, bottom_pad)), layer.weight(), layer.b, stride=s
        )
    # the conv's own (symmetric) zero padding, one launch fewer than F.pad: the outputs start
    # at the same place; the extra rows and columns it adds at the bottom and right are cut
    out = F.conv2d(crop, layer.weight(), layer.b, stride=s, padding=(top_pad, left))
    w_out = (src.shape[3] + left + right - layer.v.shape[3]) // s + 1
    return out[:, :, : r1 - r0, :w_out]


def deconv_rows(layer: _Deconv, src: Tensor, r0: int, r1: int) -> Tensor:
    """Output rows [r0, r1) of the cropped stride-2 transposed conv `layer` on `src`.

    With a kernel of height <= 2 (the model's), output row y reads input row y // 2 only.

    Returns:
        (N, Cout, r1 - r0, Wout).
    """
    kh, kw = layer.kernel
    if kh > 2:
        raise NotImplementedError(f"row caching needs transposed kernels of height <= 2, got {kh}")
    a0, a1 = r0 // 2, (r1 - 1) // 2 + 1
    y = F.conv_transpose2d(src[:, :, a0:a1], layer.weight(), layer.b, stride=2, output_padding=1)
    y = y[:, :, r0 - 2 * a0 : r1 - 2 * a0]
    W = y.shape[3]
    if layer.centred:
        return y[:, :, :, (kw - 1) // 2 : W - (kw - 1) // 2]
    return y[:, :, :, : W - kw + 1]


def _put(maps: dict[str, Tensor], key: str, r0: int, value: Tensor, height: int) -> None:
    buf = maps.get(key)
    if buf is None:  # first pass: the whole map at this level
        buf = value.new_zeros(value.shape[0], value.shape[1], height, value.shape[3])
        maps[key] = buf
    buf[:, :, r0 : r0 + value.shape[2]] = value


def _shifted(maps: dict[str, Tensor], key: str, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of the map `key` moved one row down (down_shift): row r0 - 1 .. r1 - 2."""
    m = maps[key][:, :, max(r0 - 1, 0) : r1 - 1]
    return F.pad(m, (0, 0, 1, 0)) if r0 == 0 else m


def _resnet(
    block: GatedResnet,
    maps: dict[str, Tensor],
    x_key: str,
    key: str,
    r0: int,
    r1: int,
    height: int,
    skip: Tensor | None = None,
) -> None:
    """Rows [r0, r1) of a gated resnet (and of its inner map, cached as key + '.h')."""
    x = maps[x_key]
    h = conv_rows(block.conv_in, x, r0, r1, concat_elu)
    if block.nin_skip is not None:
        h = h + block.nin_skip(concat_elu(skip))
    _put(maps, key + ".h", r0, h, height)
    o = conv_rows(block.conv_out, maps[key + ".h"], r0, r1, concat_elu)
    a, b = o.chunk(2, dim=1)
    _put(maps, key, r0, x[:, :, r0:r1] + a * torch.sigmoid(b), height)


def row_pass(
    net: PixelCNNpp,
    maps: dict[str, Tensor],
    rows: list[tuple[int, int]],
    do_u: list[bool],
    do_ul: list[bool],
    heights: list[int],
) -> str:
    """Recompute rows [rows[l][0], rows[l][1]) of every map at each level l, stream by stream.

    `maps["image"]` (N, C+1, H0, W) is the input with its channel of ones (zero rows stand for
    the padding above). A stream skipped at a level (`do_u[l]`, `do_ul[l]` False) is read
    from its cache there, which must be current. Maps are allocated on the first pass with
    heights `heights[l]` (so the first pass must compute every stream).

    Returns:
        the key of the last `ul` map at level 0 (the head's input).
    """
    img = maps["image"]
    r0, r1 = rows[0]
    h0 = heights[0]
    if do_u[0]:
        if r1 - 1 > max(r0 - 1, 0):
            _put(
                maps,
                "u_init",
                max(r0 - 1, 0),
                conv_rows(net.u_init, img, max(r0 - 1, 0), r1 - 1),
                h0,
            )
        elif "u_init" not in maps:
            maps["u_init"] = img.new_zeros(img.shape[0], net.config.filters, h0, img.shape[3])
        _put(maps, "u", r0, _shifted(maps, "u_init", r0, r1), h0)
        # the down-shifted half of ul reads the rows above only: it is vertical context like
        # u (and a row above the map must stay the shift's zeros, never a conv of padding)
        if r1 - 1 > max(r0 - 1, 0):
            v = conv_rows(net.ul_init_down, img, max(r0 - 1, 0), r1 - 1)
            _put(maps, "ul_init_down", max(r0 - 1, 0), v, h0)
        elif "ul_init_down" not in maps:
            maps["ul_init_down"] = img.new_zeros(img.shape[0], net.config.filters, h0, img.shape[3])
    if do_ul[0]:
        right = conv_rows(net.ul_init_right, img, r0, r1)
        right = F.pad(right[:, :, :, :-1], (1, 0, 0, 0))  # right_shift
        _put(maps, "ul", r0, _shifted(maps, "ul_init_down", r0, r1) + right, h0)
    us, uls = ["u"], ["ul"]
    for stage in range(LEVELS):
        r0, r1 = rows[stage]
        for k, (ru, rul) in enumerate(zip(net.up_u[stage], net.up_ul[stage], strict=True)):
            ku, kul = f"up_u.{stage}.{k}", f"up_ul.{stage}.{k}"
            if do_u[stage]:
                _resnet(ru, maps, us[-1], ku, r0, r1, heights[stage])
            if do_ul[stage]:
                skip = maps[ku][:, :, r0:r1]
                _resnet(rul, maps, uls[-1], kul, r0, r1, heights[stage], skip)
            us.append(ku)
            uls.append(kul)
        if stage < LEVELS - 1:
            s0, s1 = rows[stage + 1]
            ku, kul = f"down_u_size.{stage}", f"down_ul_size.{stage}"
            hn = heights[stage + 1]
            if do_u[stage + 1]:
                _put(maps, ku, s0, conv_rows(net.down_u_size[stage], maps[us[-1]], s0, s1), hn)
            if do_ul[stage + 1]:
                v = conv_rows(net.down_ul_size[stage], maps[uls[-1]], s0, s1)
                _put(maps, kul, s0, v, hn)
            us.append(ku)
            uls.append(kul)
    u_key, ul_key = us.pop(), uls.pop()
    for stage in range(LEVELS):
        level = LEVELS - 1 - stage
        r0, r1 = rows[level]
        for k, (ru, rul) in enumerate(zip(net.dn_u[stage], net.dn_ul[stage], strict=True)):
            ku, kul = f"dn_u.{stage}.{k}", f"dn_ul.{stage}.{k}"
            su, sul = us.pop(), uls.pop()
            if do_u[level]:
                _resnet(ru, maps, u_key, ku, r0, r1, heights[level], maps[su][:, :, r0:r1])
            if do_ul[level]:
                skip = torch.cat([maps[ku][:, :, r0:r1], maps[sul][:, :, r0:r1]], dim=1)
                _resnet(rul, maps, ul_key, kul, r0, r1, heights[level], skip)
            u_key, ul_key = ku, kul
        if stage < LEVELS - 1:
            nl = level - 1
            s0, s1 = rows[nl]
            ku, kul = f"up_u_size.{stage}", f"up_ul_size.{stage}"
            if do_u[nl]:
                _put(
                    maps,
                    ku,
                    s0,
                    deconv_rows(net.up_u_size[stage], maps[u_key], s0, s1),
                    heights[nl],
                )
            if do_ul[nl]:
                v = deconv_rows(net.up_ul_size[stage], maps[ul_key], s0, s1)
                _put(maps, kul, s0, v, heights[nl])
            u_key, ul_key = ku, kul
    return ul_key
