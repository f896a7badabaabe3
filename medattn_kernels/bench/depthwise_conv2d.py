"""Cases for depthwise_conv2d: (8, 64, 56, 56) maps (a stage-2 map of a 224 input) with K = 7, 13, 21
(MS-LKSeg's skip conv), 31 (RepLKNet), same padding, bias. The reference is F.conv2d(groups=C), i.e.
PyTorch's own depthwise kernels (mkldnn / native on CPU, cuDNN on GPU)."""
import torch

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
        def make(k=k):
            C = shape[1]
            return {"x": make_tensor(shape, dtype, device, requires_grad=True),
                    "weight": make_tensor((C, 1, k, k), dtype, device, requires_grad=True),
                    "bias": make_tensor((C,), dtype, device, requires_grad=True)}

        forward = conv_flops(*shape, k, k)
        candidates = [Candidate("reference (F.conv2d)",
                                lambda x, weight, bias: depthwise_conv2d(x, weight, bias, backend="reference"),
                                "reference")]
        candidates += [Candidate(f"medattn {b}", lambda x, weight, bias, b=b: depthwise_conv2d(x, weight, bias, backend=b))
                       for b in fused]
        out.append(Case(
            op="depthwise_conv2d", shape=f"{tuple(shape)} k{k}", make_inputs=make, candidates=candidates,
            reference64=lambda x, weight, bias, k=k: reference.depthwise_conv2d(
                x, weight, bias, [(k - 1) // 2] * 2, [1, 1]),
            flops=3 * forward, forward_flops=forward))
    return out
