"""Cases for depthwise_conv2d: (8, 64, 56, 56) maps (a stage-2 map of a 224 input) with K = 7, 13, 21
(MS-LKSeg's skip conv), 31 (RepLKNet), same padding, bias. Against F.conv2d(groups=C) in both memory
layouts, each fed its own layout (a channels_last network never converts): NCHW goes through PyTorch's
native depthwise kernels (its backward is the slow path), channels_last through oneDNN in both directions.
Ours runs on NCHW and on channels_last input (its output keeps the input's layout, as F.conv2d's does)."""
import torch
import torch.nn.functional as F

from .. import depthwise_conv2d, reference
from ..testing import make_tensor
from .harness import Candidate, Case


def conv_flops(B: int, C: int, Ho: int, Wo: int, KH: int, KW: int) -> float:
    """Multiply-adds x 2 of the forward; grad input and grad weight cost the same each."""
    return 2.0 * B * C * Ho * Wo * KH * KW


def cases(device: str, dtype: torch.dtype, quick: bool):
    shape = (2, 64, 56, 56) if quick else (8, 64, 56, 56)
    kernels = (7, 31) if quick else (7, 13, 21, 31)
    fused = ["triton", "cuda"] if device.startswith("cuda") else ["cpu"]
    out = []
    for k in kernels:
        pad = (k - 1) // 2

        def make(k=k):
            C = shape[1]
            x = make_tensor(shape, dtype, device, requires_grad=True)
            x_cl = x.detach().contiguous(memory_format=torch.channels_last).requires_grad_()
            return {"x": x, "x_cl": x_cl, "weight": make_tensor((C, 1, k, k), dtype, device, requires_grad=True),
                    "bias": make_tensor((C,), dtype, device, requires_grad=True)}

        forward = conv_flops(*shape, k, k)
        candidates = [
            Candidate("F.conv2d NCHW", lambda x, x_cl, weight, bias, pad=pad: F.conv2d(
                x, weight, bias, padding=pad, groups=weight.shape[0]), "builtin"),
            Candidate("F.conv2d channels_last", lambda x, x_cl, weight, bias, pad=pad: F.conv2d(
                x_cl, weight, bias, padding=pad, groups=weight.shape[0]), "builtin"),
        ]
        for b in fused:
            candidates += [
                Candidate(f"medattn {b} NCHW", lambda x, x_cl, weight, bias, b=b: depthwise_conv2d(
                    x, weight, bias, backend=b)),
                Candidate(f"medattn {b} channels_last", lambda x, x_cl, weight, bias, b=b: depthwise_conv2d(
                    x_cl, weight, bias, backend=b)),
            ]
        out.append(Case(
            op="depthwise_conv2d", shape=f"{tuple(shape)} k{k}", make_inputs=make, candidates=candidates,
            reference64=lambda x, x_cl, weight, bias, k=k: reference.depthwise_conv2d(
                x, weight, bias, [(k - 1) // 2] * 2, [1, 1]),
            flops=3 * forward, forward_flops=forward))
    return out
