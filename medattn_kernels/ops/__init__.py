"""Public functional ops. Importing this package registers fakes, autograd and GPU kernels for every
op on torch.ops.medattn (see _registry.py)."""
from .depthwise_conv2d import depthwise_conv2d
from .global_spatial_attention import global_spatial_attention
from .sobel_boundary_loss import sobel_boundary_loss

__all__ = ["global_spatial_attention", "sobel_boundary_loss", "depthwise_conv2d"]
