"""A fast forward of :class:`~fastshare.model.heads.ASPPHead` from the head's own parameters.

:func:`aspp_head_forward` computes exactly ``head(x)`` (dropout aside: its random masks differ) with the
same parameters, so state dicts and optimisers are untouched. Where the time goes in the plain module:
four dilated 3x3 convolutions ``C_in -> W`` (most of the FLOPs), four ``W -> W`` 1x1 convolutions, four
``W -> classes`` 1x1 convolutions and the sum. The fast path:

1. **Exact tap pruning.** A 3x3 convolution with dilation ``d`` and padding ``d`` reads, for output row
   ``i``, input rows ``i - d, i, i + d``. If ``d >= h`` the rows ``i +- d`` lie in the zero padding for every
   ``i`` in ``[0, h)``, so the top and bottom kernel rows only ever multiply zeros; likewise the left and
   right columns if ``d >= w``. Dropping them is exact: the kernel becomes ``1x3``, ``3x1`` or ``1x1``
   (centre tap). At output stride 8, a 128x128 image gives 16x16 features, so the ASPP rates 18 and 24
   become 1x1 convolutions (9x fewer FLOPs in those branches) and their gradients reach only the centre
   tap, as in the full convolution, whose other taps see only zeros. For ``d < h`` the other branches go
   through :func:`fastshare.ops.pruned_conv.pruned_conv3x3`, which can also split the output into bands
   that skip the zero-padding products of the border rows and columns (at 41 x 41 features: 19-63 % of a
   branch's FLOPs), one matmul per band region; whether it splits is timed once per shape
   (``FASTSHARE_CONV_SPLIT``).
2. **One matmul for all 1x1 branches.** The branches whose first convolution became 1x1 read the same
   input, so their weights are concatenated into one ``(C_in, n W)`` matrix and applied with one
   ``addmm`` over the ``N = B h w`` pixel rows (a view of channels_last features; on CUDA, NCHW float32
   features are transposed once, since cuDNN's float32 channels_last convolutions are slow). Branches
   whose dropouts differ (see 4.) go into one such matmul per distinct dropout probability; the usual
   head, one ``p`` for all branches, needs one.
3. **Matmuls instead of 1x1 convolutions.** Each ``W -> W`` convolution is an ``addmm`` on its branch's
   column block; the ``W -> classes`` convolutions and the branch sum are one chain of ``addmm`` calls
   accumulating into one ``(N, classes)`` output with the summed bias (``sum_j (H_j W3_j^T + b3_j)``),
   with no concatenation copy.
4. Dropout as the module applies it: each branch's own ``nn.Dropout`` decides, active iff that module is
   in training mode and its ``p > 0`` (``head.training`` is not consulted: ``head.train()`` followed by
   ``dropout.eval()`` means no dropout, as in ``head(x)``). ReLU in place on freshly produced matmul
   outputs where dropout is inactive; where active, ReLU + dropout in one pass
   (:func:`fastshare.ops.relu_dropout`: counter-based mask, one byte per element saved for backward instead
   of the ReLU output and a float dropout mask).

Shapes: ``x (B, C_in, h, w) -> (B, classes, h, w)``, contiguous output.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from fastshare.model.heads import ASPPHead, ClassificationModule
from fastshare.ops.pruned_conv import pruned_conv3x3
from fastshare.ops.relu_dropout import relu_dropout

__all__ = ["aspp_head_forward"]


def _is_standard_branch(branch: ClassificationModule) -> bool:
    c1, c2, c3 = branch.conv1, branch.conv2, branch.conv3
    d = c1.dilation[0]
    return (c1.kernel_size == (3, 3) and c1.stride == (1, 1) and c1.dilation == (d, d) and c1.padding == (d, d)
            and c1.groups == 1 and c1.bias is not None and c1.padding_mode == "zeros"
            and all(c.kernel_size == (1, 1) and c.stride == (1, 1) and c.padding == (0, 0) and c.groups == 1
                    and c.bias is not None for c in (c2, c3))
            and type(branch.dropout) is nn.Dropout)


def _drop_p(branch: ClassificationModule) -> float:
    """The dropout probability ``branch(x)`` applies: its ``nn.Dropout``'s ``p`` while that module is in
    training mode, else 0 (``nn.Dropout`` follows its own ``training`` flag, not the head's)."""
    dropout = branch.dropout
    return float(dropout.p) if dropout.training and dropout.p > 0 else 0.0


def _relu_dropout(t: torch.Tensor, p: float) -> torch.Tensor:
    """``dropout(relu(t), p)``; ``p = 0``: inactive dropout."""
    if p > 0:
        return relu_dropout(t, p, True)
    # ReLU in place: t is a fresh matmul/conv output that nothing else has saved.
    return torch.relu_(t)


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(B, C, h, w) -> (B h w, C)`` pixel rows (a view for channels_last ``t``)."""
    return t.permute(0, 2, 3, 1).reshape(-1, t.shape[1])


def aspp_head_forward(head: ASPPHead, x: torch.Tensor) -> torch.Tensor:
    """``head(x)`` computed with exact tap pruning and fused matmuls (see the module docstring).

    Args:
        head: an :class:`ASPPHead` (its parameters are used as they are; nothing is copied).
        x: ``(B, C_in, h, w)`` features, any layout (on the CPU made channels_last once).

    Returns:
        ``(B, classes, h, w)`` contiguous, equal to ``head(x)`` up to float rounding when dropout is
        inactive. A head whose branches are not the standard ASPP shape runs its own forward.
    """
    branches = head.branches()
    if x.ndim != 4 or not branches or not all(_is_standard_branch(b) for b in branches):
        return head(x)
    bsz, _, height, width = x.shape
    drop = [_drop_p(b) for b in branches]
    # CPU: channels_last (oneDNN's fastest layout here, and the pixel rows become views). CUDA: the
    # input's own layout, because cuDNN's channels_last kernels are fast in half precision but not in IEEE
    # float32: on an H200 a float32 step with channels_last dilated head convolutions ran ~10x slower.
    xc = x if x.is_cuda else x.contiguous(memory_format=torch.channels_last)
    # 1x1 branches, grouped by dropout probability (one group, i.e. one matmul, when all branches agree).
    groups: dict[float, list[int]] = {}
    for j, b in enumerate(branches):
        if b.conv1.dilation[0] >= max(height, width):
            groups.setdefault(drop[j], []).append(j)
    hidden: list[torch.Tensor | None] = [None] * len(branches)
    for p, point in groups.items():
        w_cat = torch.cat([branches[j].conv1.weight[:, :, 1, 1] for j in point], dim=0)  # centre taps
        b_cat = torch.cat([branches[j].conv1.bias for j in point], dim=0)
        a_cat = _relu_dropout(torch.addmm(b_cat, _rows(xc), w_cat.t()), p)
        offset = 0
        for j in point:
            n = branches[j].conv1.out_channels
            hidden[j] = a_cat[:, offset:offset + n]
            offset += n
    for j, branch in enumerate(branches):
        if hidden[j] is None:
            conv = branch.conv1
            a = pruned_conv3x3(xc, conv.weight, conv.bias, conv.dilation[0])
            hidden[j] = _relu_dropout(_rows(a), drop[j])
    out = None
    for j, branch in enumerate(branches):
        c2, c3 = branch.conv2, branch.conv3
        h2 = torch.addmm(c2.bias, hidden[j], c2.weight.reshape(c2.out_channels, -1).t())
        h2 = _relu_dropout(h2, drop[j])
        w3 = c3.weight.reshape(c3.out_channels, -1).t()
        if out is None:
            bias = torch.stack([b.conv3.bias for b in branches]).sum(0)
            out = torch.addmm(bias, h2, w3)
        else:
            out = torch.addmm(out, h2, w3)
    # The class count explicitly: a -1 is ambiguous for an empty batch (N = 0 rows).
    return out.reshape(bsz, height, width, out.shape[1]).permute(0, 3, 1, 2).contiguous()
