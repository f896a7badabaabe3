"""Pure-PyTorch references: the oracle every kernel is tested against and the baseline every benchmark
times. They follow ../shared/docs/design.md section 2 literally (materialised scores, pooled maps...),
work in any floating dtype (tests run them in float64) and on any device. Arguments are validated by
the public wrappers (medattn_kernels.ops), not here."""
from .activated_batch_norm import activated_batch_norm
from .cross_attention import (bidirectional_cross_attention, cross_attention, sdpa_bidirectional_cross_attention,
                              sdpa_cross_attention, sdpa_tied_cross_attention, tied_cross_attention)
from .depthwise_conv2d import depthwise_conv2d
from .global_spatial_attention import global_spatial_attention
from .sobel_boundary_loss import sobel_boundary_loss, sobel_differences

__all__ = [
    "activated_batch_norm",
    "cross_attention", "bidirectional_cross_attention", "tied_cross_attention",
    "sdpa_cross_attention", "sdpa_bidirectional_cross_attention", "sdpa_tied_cross_attention",
    "global_spatial_attention", "depthwise_conv2d", "sobel_boundary_loss", "sobel_differences",
]
