"""Cases for global_spatial_attention: DIN stage-1 maps (8, 96, 56, 56) and (8, 64, 112, 112), one input
and the DIFM sum; and a 3-D volume (a 3-D U-Net's second level, channels_last_3d as well as NCDHW). Against
the eager composite (the reference: x * sigmoid(x.mean(1))) and its torch.compile (Inductor fuses the
passes). Memory-bound: the rate column is the minimum traffic (forward: read x (and y), write the output;
backward: read the output gradient and x (and y), write their gradients) over the time, against the
machine's copy bandwidth."""
import torch

from .. import global_spatial_attention, reference
from ..testing import make_tensor
from .harness import Candidate, Case, compiled


def _traffic(shape, dtype, n_in: int) -> dict:
    tensor_bytes = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    forward_bytes = (n_in + 1) * tensor_bytes
    return dict(forward_bytes=forward_bytes, bytes=forward_bytes + (1 + 2 * n_in) * tensor_bytes)


def cases(device: str, dtype: torch.dtype, quick: bool):
    shapes = [(2, 96, 56, 56)] if quick else [(8, 96, 56, 56), (8, 64, 112, 112)]
    volumes = [(1, 16, 16, 24, 24)] if quick else [(2, 32, 48, 64, 64)]
    fused = "triton" if device.startswith("cuda") else "cpu"
    out = []
    for shape in shapes:
        for two in (False, True):
            def make(shape=shape, two=two):
                x = make_tensor(shape, dtype, device, requires_grad=True)
                return {"x": x, "y": make_tensor(shape, dtype, device, requires_grad=True) if two else None}

            out.append(Case(
                op="global_spatial_attention", shape=f"{tuple(shape)}{' x+y' if two else ''}", make_inputs=make,
                candidates=[
                    Candidate("reference (eager)", lambda x, y: global_spatial_attention(x, y, backend="reference"),
                              "reference"),
                    Candidate("torch.compile(reference)", compiled(reference.global_spatial_attention), "builtin"),
                    Candidate(f"medattn {fused}", lambda x, y: global_spatial_attention(x, y, backend=fused)),
                ],
                reference64=reference.global_spatial_attention, **_traffic(shape, dtype, 2 if two else 1)))
    for shape in volumes:
        for layout in ("contiguous", "channels_last"):
            def make_volume(shape=shape, layout=layout):
                return {"x": make_tensor(shape, dtype, device, layout, requires_grad=True)}

            out.append(Case(
                op="global_spatial_attention", shape=f"{tuple(shape)}{' cl3d' if layout != 'contiguous' else ''}",
                make_inputs=make_volume,
                candidates=[Candidate("reference (eager)", lambda x: global_spatial_attention(x, backend="reference"),
                                      "reference"),
                            Candidate("torch.compile(reference)", compiled(reference.global_spatial_attention),
                                      "builtin"),
                            Candidate(f"medattn {fused}", lambda x: global_spatial_attention(x, backend=fused))],
                reference64=reference.global_spatial_attention, **_traffic(shape, dtype, 1)))
    return out
