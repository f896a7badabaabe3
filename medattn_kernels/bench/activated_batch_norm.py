"""Cases for activated_batch_norm at DIN's full- and half-resolution block shapes (demo widths):
the op alone, and behind a conv3x3 as in a network block (there the composite keeps BN's input, the
conv output, and the activation; the fused op keeps the activation only); and behind a conv3x3x3 on a 3-D
volume. Against the eager built-ins (BatchNorm2d/3d + LeakyReLU) and torch.compile of the reference.
Memory-bound: the rate column of the op alone is the minimum traffic (forward: read x, write y; backward:
read dy and y, write dx) over the time, against the machine's copy bandwidth."""
import torch
import torch.nn.functional as F

from .. import activated_batch_norm, reference
from ..testing import make_tensor
from .harness import Candidate, Case, compiled


def _params(channels, dtype, device):
    weight = torch.empty(channels, dtype=dtype, device=device).uniform_(0.5, 1.5).requires_grad_()
    bias = torch.empty(channels, dtype=dtype, device=device).uniform_(-0.5, 0.5).requires_grad_()
    return weight, bias


def _builtin(x, weight, bias):
    """PyTorch's BatchNorm + LeakyReLU (in place) with the op's scale |weight| + eps: the same y, without
    the reference's separate statistics pass."""
    y = F.batch_norm(x, None, None, weight.abs() + 1e-5, bias, training=True, eps=1e-5)
    return F.leaky_relu(y, 0.01, inplace=True)


def cases(device: str, dtype: torch.dtype, quick: bool):
    shapes = [(2, 12, 96, 96)] if quick else [(8, 12, 224, 224), (8, 24, 112, 112)]
    shapes += [(1, 8, 16, 32, 32)] if quick else [(2, 16, 48, 64, 64)]  # 3-D: a 3-D U-Net's first level
    fused = "triton" if device.startswith("cuda") else "cpu"
    out = []
    for shape in shapes:
        tensor_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()

        def make(shape=shape):
            weight, bias = _params(shape[1], dtype, device)
            return {"x": make_tensor(shape, dtype, device, requires_grad=True), "weight": weight, "bias": bias}

        out.append(Case(
            op="activated_batch_norm", shape=str(tuple(shape)), make_inputs=make,
            candidates=[
                Candidate("reference", lambda x, weight, bias: activated_batch_norm(
                    x, weight, bias, backend="reference")[0], "reference"),
                Candidate(f"BatchNorm{len(shape) - 2}d + LeakyReLU", _builtin, "builtin"),
                Candidate("torch.compile(reference)", compiled(
                    lambda x, weight, bias: reference.activated_batch_norm(x, weight, bias)[0]), "builtin"),
                Candidate(f"medattn {fused}", lambda x, weight, bias: activated_batch_norm(
                    x, weight, bias, backend=fused)[0]),
            ],
            reference64=lambda x, weight, bias: reference.activated_batch_norm(x, weight, bias)[0],
            forward_bytes=2 * tensor_bytes, bytes=5 * tensor_bytes))

        def make_block(shape=shape):
            inputs = make(shape)
            conv = torch.empty((shape[1], shape[1]) + (3,) * (len(shape) - 2), dtype=dtype,
                               device=device).uniform_(-0.2, 0.2)
            return dict(inputs, conv=conv.requires_grad_())

        conv_nd = F.conv2d if len(shape) == 4 else F.conv3d

        def block(backend, conv_nd=conv_nd):
            if backend == "builtin":
                return lambda x, conv, weight, bias: _builtin(conv_nd(x, conv, padding=1), weight, bias)
            return lambda x, conv, weight, bias: activated_batch_norm(
                conv_nd(x, conv, padding=1), weight, bias, backend=backend)[0]

        out.append(Case(
            op="activated_batch_norm", shape=f"conv{'x'.join('3' * (len(shape) - 2))} + {tuple(shape)}",
            make_inputs=make_block,
            candidates=[Candidate("reference", block("reference"), "reference"),
                        Candidate(f"BatchNorm{len(shape) - 2}d + LeakyReLU", block("builtin"), "builtin"),
                        Candidate("torch.compile(conv + reference)", compiled(block("reference")), "builtin"),
                        Candidate(f"medattn {fused}", block(fused))],
            reference64=block("reference")))
    return out
