from typing import Optional, Tuple

import torch


def _scale(d: int, scale: Optional[float]) -> float:
    return d ** -0.5 if scale is None else scale


def cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                    gate: Optional[torch.Tensor] = None) -> torch.Tensor:
    """softmax(scale q k^T) v, times sigmoid(gate) per query when a gate [B,H,Nq] is given."""
    scores = (q @ k.transpose(-1, -2)) * _scale(q.shape[-1], scale)
    out = torch.softmax(scores, dim=-1) @ v
    if gate is not None:
        out = out * torch.sigmoid(gate).unsqueeze(-1)
    return out


def bidirectional_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b,
                                  scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """DIFM: image a attends to image b and b to a."""
    return cross_attention(q_a, k_b, v_b, scale), cross_attention(q_b, k_a, v_a, scale)


def tied_cross_attention(r_a, v_a, r_b, v_b, scale: Optional[float] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """One similarity S = scale r_a r_b^T: rows softmaxed for a->b, columns for b->a (BiXT)."""
    scores = (r_a @ r_b.transpose(-1, -2)) * _scale(r_a.shape[-1], scale)
    o_a = torch.softmax(scores, dim=-1) @ v_b
    o_b = torch.softmax(scores, dim=-2).transpose(-1, -2) @ v_a
    return o_a, o_b


# ---- the best a PyTorch user has: F.scaled_dot_product_attention on contiguous q/k/v. On CPU, SDPA takes
# its flash kernel only for contiguous inputs; on the strided token views a U-Net produces it falls back to
# the math path, which keeps the N x N probabilities (design.md section 4). These are the benchmarks'
# baselines and the attention of the models' `attention="sdpa"` variant.
def sdpa_cross_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None,
                         gate: Optional[torch.Tensor] = None, contiguous: bool = True) -> torch.Tensor:
    """cross_attention through F.scaled_dot_product_attention (on contiguous copies unless told not to)."""
    if contiguous:
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=scale)
    return out if gate is None else out * torch.sigmoid(gate).unsqueeze(-1)


def sdpa_bidirectional_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b, scale: Optional[float] = None,
                                       contiguous: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two SDPA calls, one per direction."""
    return (sdpa_cross_attention(q_a, k_b, v_b, scale, contiguous=contiguous),
            sdpa_cross_attention(q_b, k_a, v_a, scale, contiguous=contiguous))


def sdpa_tied_cross_attention(r_a, v_a, r_b, v_b, scale: Optional[float] = None,
                              contiguous: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """Two SDPA calls: softmax_col(S)^T v_a = softmax(scale r_b r_a^T) v_a, the b->a attention."""
    return (sdpa_cross_attention(r_a, r_b, v_b, scale, contiguous=contiguous),
            sdpa_cross_attention(r_b, r_a, v_a, scale, contiguous=contiguous))
