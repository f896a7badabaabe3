"""Public functional ops. Importing this package registers fakes, autograd and GPU kernels for every
op on torch.ops.medattn (see _registry.py)."""
from .depthwise_conv2d import depthwise_conv2d
from .global_spatial_attention import global_spatial_attention

__all__ = ["global_spatial_attention", "depthwise_conv2d"]
