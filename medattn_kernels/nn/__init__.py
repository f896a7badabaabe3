"""nn.Module wrappers of the fused ops."""
from .losses import DINLoss, SobelBoundaryLoss, soft_dice_loss  # noqa: F401
