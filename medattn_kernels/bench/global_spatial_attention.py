"""Cases for global_spatial_attention: DIN stage-1 maps (8, 96, 56, 56), one input and the DIFM sum; and a
3-D volume (a 3-D U-Net's second level, channels_last_3d as well as NCDHW)."""
import torch

from .. import global_spatial_attention, reference
from ..testing import make_tensor
from .harness import Candidate, Case


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
                    Candidate("reference", lambda x, y: global_spatial_attention(x, y, backend="reference"),
                              "reference"),
                    Candidate(f"medattn {fused}", lambda x, y: global_spatial_attention(x, y, backend=fused)),
                ],
                reference64=reference.global_spatial_attention))
    for shape in volumes:
        for layout in ("contiguous", "channels_last"):
            def make_volume(shape=shape, layout=layout):
                return {"x": make_tensor(shape, dtype, device, layout, requires_grad=True)}

            out.append(Case(
                op="global_spatial_attention", shape=f"{tuple(shape)}{' cl3d' if layout != 'contiguous' else ''}",
                make_inputs=make_volume,
                candidates=[Candidate("reference", lambda x: global_spatial_attention(x, backend="reference"),
                                      "reference"),
                            Candidate(f"medattn {fused}", lambda x: global_spatial_attention(x, backend=fused))],
                reference64=reference.global_spatial_attention))
    return out
