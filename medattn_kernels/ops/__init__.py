"""Public functional ops. Importing this package registers fakes, autograd and GPU kernels for every
op on torch.ops.medattn (see _registry.py)."""
from .activated_batch_norm import activated_batch_norm
from .cross_attention import bidirectional_cross_attention, cross_attention, tied_cross_attention
from .depthwise_conv2d import depthwise_conv2d
from .global_spatial_attention import global_spatial_attention
from .sobel_boundary_loss import sobel_boundary_loss

__all__ = ["activated_batch_norm", "global_spatial_attention", "cross_attention", "bidirectional_cross_attention", "tied_cross_attention",
           "depthwise_conv2d", "sobel_boundary_loss"]
