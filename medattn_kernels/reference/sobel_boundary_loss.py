from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

REDUCTIONS = ("none", "mean", "sum")


def replicate_pad1(u: torch.Tensor) -> torch.Tensor:
    """F.pad(u, (1, 1, 1, 1), mode="replicate"), value for value, written as edge copies: Inductor (torch
    2.13) fails on the backward of aten.replication_pad2d (an assert_size_stride mismatch in its compiled
    backward), so with F.pad the reference could not be a torch.compile baseline; eager is no slower."""
    u = torch.cat([u[..., :1, :], u, u[..., -1:, :]], dim=-2)
    return torch.cat([u[..., :1], u, u[..., -1:]], dim=-1)


def sobel_magnitude(u: torch.Tensor, eps: float) -> torch.Tensor:
    """sqrt(gx^2 + gy^2 + eps) with the Sobel pair / 8, replicate padding, cross-correlation."""
    c = u.shape[1]
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], dtype=u.dtype, device=u.device) / 8
    weight = torch.stack([kx, kx.t()]).unsqueeze(1).repeat(c, 1, 1, 1)  # [2C,1,3,3]: gx, gy per channel
    g = F.conv2d(replicate_pad1(u), weight, groups=c)
    gx, gy = g[:, 0::2], g[:, 1::2]
    return torch.sqrt(gx * gx + gy * gy + eps)


def sobel_differences(pred: torch.Tensor, target: torch.Tensor, scales: Sequence[int] = (1, 2, 4), eps: float = 1e-6,
                      from_logits: bool = False, ignore_index: Optional[int] = None) -> List[Optional[torch.Tensor]]:
    """Per scale s, the signed map G(P_s(p)) - G(P_s(y)) whose |.| the loss reduces (see sobel_boundary_loss),
    or None where the pooled map is empty."""
    p = torch.softmax(pred, dim=1) if from_logits else pred
    if target.dtype == torch.int64:
        valid = torch.ones_like(target, dtype=torch.bool) if ignore_index is None else target != ignore_index
        y = F.one_hot(torch.where(valid, target, 0), p.shape[1]).permute(0, 3, 1, 2).to(p.dtype)
        mask = valid.unsqueeze(1).to(p.dtype)
        y, p = y * mask, p * mask
    else:
        y = target.to(p.dtype)
    out: List[Optional[torch.Tensor]] = []
    for s in scales:
        if p.shape[-2] // s == 0 or p.shape[-1] // s == 0:
            out.append(None)
            continue
        ps = p if s == 1 else F.avg_pool2d(p, s, s)
        ys = y if s == 1 else F.avg_pool2d(y, s, s)
        out.append(sobel_magnitude(ps, eps) - sobel_magnitude(ys, eps))
    return out


def sobel_boundary_loss(pred: torch.Tensor, target: torch.Tensor, scales: Sequence[int] = (1, 2, 4),
                        weights: Optional[Sequence[float]] = None, eps: float = 1e-6, from_logits: bool = False,
                        ignore_index: Optional[int] = None, reduction: str = "mean") -> torch.Tensor:
    """sum_s w_s * reduce | G(P_s(p)) - G(P_s(y)) |, P_s = avg_pool2d(kernel=stride=s, floor).

    int64 targets [B,H,W] are one-hot encoded; pixels equal to ignore_index are zeroed in both the
    prediction and the target before pooling (they carry no gradient and no label). A scale whose
    pooled map is empty contributes 0. reduction "none" gives one loss per image ([B])."""
    weights = [1.0] * len(scales) if weights is None else list(weights)
    batch = pred.shape[0]
    total = pred.new_zeros(batch) if reduction == "none" else pred.new_zeros(())
    for signed, w in zip(sobel_differences(pred, target, scales, eps, from_logits, ignore_index), weights):
        if signed is None:
            continue
        diff = signed.abs()
        if reduction == "none":
            total = total + w * diff.flatten(1).mean(dim=1)
        elif reduction == "mean":
            total = total + w * diff.mean()
        else:
            total = total + w * diff.sum()
    return total
