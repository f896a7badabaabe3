"""Reference networks built on the medattn layers (design.md section 3; docs/models.md says which parts
are our reading of the papers). Every network takes ``fused: bool`` (True: medattn fused ops, False: the
pure-PyTorch references, same parameters) and follows `SegmentationModel`'s interface."""
from __future__ import annotations

from ._common import SegmentationModel
from .cross_modal_sad import CrossModalSADNet
from .din import DIN
from .ds2f import DS2F
from .joint_attention_dense_unet import JointAttentionDenseUNet
from .mslkseg import MSLKSeg

NETWORKS = {
    "din": DIN,
    "joint-attention-dense-unet": JointAttentionDenseUNet,
    "mslkseg": MSLKSeg,
    "ds2f": DS2F,
    "cross-modal-sad": CrossModalSADNet,
}


def build_model(name: str, fused: bool = True, **kwargs) -> SegmentationModel:
    """A network by its NETWORKS name (case-insensitive, '_' or '-')."""
    key = name.lower().replace("_", "-")
    if key not in NETWORKS:
        raise ValueError(f"name: expected one of {sorted(NETWORKS)}, got {name!r}")
    return NETWORKS[key](fused=fused, **kwargs)


__all__ = ["NETWORKS", "build_model", "SegmentationModel", "DIN", "JointAttentionDenseUNet", "MSLKSeg", "DS2F",
           "CrossModalSADNet"]
