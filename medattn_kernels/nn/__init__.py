"""nn.Modules built on the fused ops. Each takes `fused: bool`; fused=False runs the pure-PyTorch
references, for side-by-side checks."""
from .activated_batch_norm import ActivatedBatchNorm1d, ActivatedBatchNorm2d, ActivatedBatchNorm3d
from .attention import CrossImageAttention, DualInteractiveFusion, JointAttention
from .depthwise import DepthwiseConv2d, LargeKernelDWConv2d
from .global_spatial_attention import GlobalSpatialAttention
from .losses import DINLoss, SobelBoundaryLoss, soft_dice_loss

__all__ = ["ActivatedBatchNorm1d", "ActivatedBatchNorm2d", "ActivatedBatchNorm3d", "GlobalSpatialAttention", "CrossImageAttention", "DualInteractiveFusion", "JointAttention",
           "DepthwiseConv2d", "LargeKernelDWConv2d", "SobelBoundaryLoss", "DINLoss", "soft_dice_loss"]
