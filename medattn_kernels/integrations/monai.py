"""MONAI (1.6) blocks on the fused ops: the patchers `medattn_kernels.patch` applies to MONAI models.

* ``SABlock`` and ``CrossAttentionBlock`` (combined ``qkv`` or separate ``to_q/to_k/to_v`` projections; MONAI's
  einsum-softmax path and its ``use_flash_attention`` SDPA path) -> ``cross_attention``: the projections,
  rearranges, output projection and output dropout are the block's own modules; only
  ``softmax(scale q k^T) v`` runs on the op, which keeps O(N) for backward instead of the N x N matrix.
* ``SpatialAttentionBlock``: through its ``SABlock`` (``.attn``); GroupNorm, reshapes and residual stay.
* ``UnetBasicBlock`` / ``UnetResBlock`` (DynUNet, UNETR's encoders and decoders) with ``BatchNorm*d`` +
  ``LeakyReLU`` -> ``activated_batch_norm``: every BatchNorm directly followed by the block's LeakyReLU
  (both of UnetBasicBlock's; UnetResBlock's ``norm1``, whose ``norm2`` feeds the residual sum first). The
  op runs with BatchNorm's *signed* weight (``signed_weight_activated_batch_norm``: the op's scale
  ``|w'| + eps`` with ``w' = |w| - eps``, and x negated in channels whose weight is negative), so the block
  computes the stock function on the stock parameters; a call where some ``|weight| <= eps`` (not
  representable) runs the stock forward. Running statistics update as BatchNorm's do.
* ``WindowAttention`` (SwinUNETR): reported, not patched (relative position bias and window masks).

Semantics follow MONAI 1.6.1's forwards (read them before changing anything here): configurations the
ops do not compute are left alone with the reason; conditions known only per call run the stock forward
for that call, counted in ``patch_state(module).calls``.
"""
from __future__ import annotations

from typing import Optional

import torch
from monai.networks.blocks import CrossAttentionBlock, SABlock, SpatialAttentionBlock
from monai.networks.blocks.dynunet_block import UnetBasicBlock, UnetResBlock
from torch import nn

from ..nn.activated_batch_norm import running_stats_step
from ..ops.activated_batch_norm import signed_weight_activated_batch_norm, signed_weight_plan
from ..ops.cross_attention import cross_attention
from ..patch import Patcher, count_call, count_fused, fused_kernel_for, op_backend, register_patcher, stock_forward


def _dtype(name: str) -> str:
    return str(name).replace("torch.", "")


# ---------------------------------------------------------------- attention -> cross_attention
def _attention_unsupported(block: nn.Module) -> Optional[str]:
    if block.causal:
        return "causal=True: the op has no causal mask"
    if block.rel_positional_embedding is not None:
        return "rel_pos_embedding: added to the N x N scores, which the op never forms"
    if block.save_attn:
        return "save_attn=True: keeps the N x N attention matrix, which the op never forms"
    if block.use_flash_attention and block.dropout_rate > 0:
        return (f"use_flash_attention with dropout_rate={block.dropout_rate}: MONAI's SDPA call drops "
                f"attention weights in eval mode too")
    return None


def _effective_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the projections produce: autocast's where it is on (Linear runs in it), else x's."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def _attention_call_fallback(block: nn.Module, x: torch.Tensor) -> Optional[str]:
    """Why this call must run the stock forward, or None."""
    if not block.use_flash_attention and block.drop_weights.training and block.drop_weights.p > 0:
        return "training with attention dropout"
    dtype = _effective_dtype(x)
    if block.attention_dtype is not None and block.attention_dtype != dtype:
        return f"attention_dtype {_dtype(block.attention_dtype)} differs from the input's {_dtype(dtype)}"
    if not fused_kernel_for("cross_attention", dtype, x.device, op_backend(block)):
        return f"no fused kernel for {_dtype(dtype)} on {x.device.type}"
    return None


def _is_plain_linear(module: nn.Module) -> bool:
    """An nn.Linear whose call is exactly F.linear: no subclass (a LoRA adapter), no hooks."""
    hooks = (module._forward_hooks, module._forward_pre_hooks, module._backward_hooks,
             nn.modules.module._global_forward_hooks, nn.modules.module._global_forward_pre_hooks)
    return type(module) is nn.Linear and not any(hooks)


def _project_heads(linear: nn.Linear, out: torch.Tensor) -> torch.Tensor:
    """``linear(rearrange(out, "b l n d -> b n (l d)"))`` without the rearranged copy: the op writes
    ``[B, heads, N, d]``, and the copy Linear would keep for backward is a second output-sized tensor next to
    the op's own saved output (SDPA writes token-major, so MONAI's flash path keeps one). Per image, one
    batched matmul over heads, ``out[b, h] @ W[:, h]^T``, summed over heads: it keeps views of ``out`` and of
    the weight (one matmul over all images would keep the weight expanded to every image); the
    ``[heads, N, O]`` partial products are transient."""
    heads, head_dim = out.shape[1], out.shape[3]
    weight = linear.weight.view(linear.out_features, heads, head_dim).permute(1, 2, 0)  # [heads, d, O]
    y = torch.stack([torch.matmul(image, weight).sum(0) for image in out.unbind(0)])
    return y if linear.bias is None else y + linear.bias


def _attend(block: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """From the rearranged [B, heads, N, d] projections to the block's output, as MONAI's forward does."""
    count_fused(block)
    out = cross_attention(q, k, v, scale=block.scale, backend=op_backend(block))
    if not getattr(block, "include_fc", True):  # CrossAttentionBlock always projects
        return block.drop_output(block.out_rearrange(out))
    if out.shape[1] > 1 and _is_plain_linear(block.out_proj):
        return block.drop_output(_project_heads(block.out_proj, out))
    return block.drop_output(block.out_proj(block.out_rearrange(out)))


def _sablock_forward(block: SABlock, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None):
    if attn_mask is not None:
        return stock_forward(block, "attn_mask given", x, attn_mask=attn_mask)
    reason = _attention_call_fallback(block, x)
    if reason is not None:
        return stock_forward(block, reason, x)
    if block.use_combined_linear:
        qkv = block.input_rearrange(block.qkv(x))
        q, k, v = qkv[0], qkv[1], qkv[2]
    else:
        q, k, v = (block.input_rearrange(proj(x)) for proj in (block.to_q, block.to_k, block.to_v))
    return _attend(block, q, k, v)


def _cross_attention_forward(block: CrossAttentionBlock, x: torch.Tensor, context: Optional[torch.Tensor] = None):
    reason = _attention_call_fallback(block, x)
    if reason is not None:
        return stock_forward(block, reason, x, context=context)
    kv = context if context is not None else x
    q = block.input_rearrange(block.to_q(x))
    k, v = block.input_rearrange(block.to_k(kv)), block.input_rearrange(block.to_v(kv))
    return _attend(block, q, k, v)


def _describe_attention(block: nn.Module) -> str:
    heads = block.num_heads
    head_dim = getattr(block, "dim_head", getattr(block, "head_dim", None))
    layout = "qkv" if getattr(block, "use_combined_linear", False) else "to_q/to_k/to_v"
    return f"{heads} heads x {head_dim}, {layout}{', was SDPA' if block.use_flash_attention else ''}"


ATTENTION_PER_CALL = ("an attn_mask is given, in training with attention dropout, when attention_dtype is not "
                      "the input's dtype, or without a fused kernel for the dtype")

SA_BLOCK = register_patcher(Patcher(
    name="monai SABlock", op="cross_attention", types=(SABlock,), forward=_sablock_forward,
    unsupported=_attention_unsupported, per_call=ATTENTION_PER_CALL, describe=_describe_attention))
CROSS_ATTENTION_BLOCK = register_patcher(Patcher(
    name="monai CrossAttentionBlock", op="cross_attention", types=(CrossAttentionBlock,),
    forward=_cross_attention_forward, unsupported=_attention_unsupported,
    per_call=ATTENTION_PER_CALL.replace("an attn_mask is given, ", ""), describe=_describe_attention))
SPATIAL_ATTENTION_BLOCK = register_patcher(Patcher(
    name="monai SpatialAttentionBlock", op="cross_attention", types=(SpatialAttentionBlock,), via="attn"))


def _is_swin_window_attention(module: nn.Module) -> bool:
    cls = type(module)
    return cls.__name__ == "WindowAttention" and cls.__module__.startswith("monai.")


SWIN_WINDOW_ATTENTION = register_patcher(Patcher(
    name="monai WindowAttention", op="cross_attention", types=(), applies=_is_swin_window_attention,
    unsupported=lambda module: "SwinUNETR window attention: adds a relative position bias and shifted-window "
                               "masks to the scores (the op takes neither)"))


# ---------------------------------------------------------------- BatchNorm + LeakyReLU -> activated_batch_norm
_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def _fused_norms(block: nn.Module) -> tuple:
    """The block's norms that feed its LeakyReLU directly."""
    return ("norm1", "norm2") if type(block) is UnetBasicBlock else ("norm1",)


def _bn_block_unsupported(block: nn.Module) -> Optional[str]:
    act = block.lrelu
    if type(act) is not nn.LeakyReLU:
        return f"activation {type(act).__name__}: activated_batch_norm computes LeakyReLU"
    if not act.negative_slope > 0:
        return f"LeakyReLU slope {act.negative_slope}: the op inverts the activation, so it needs slope > 0"
    for name in _fused_norms(block):
        norm = getattr(block, name)
        if type(norm) not in _BATCH_NORMS:
            return f"{name} is {type(norm).__name__}: activated_batch_norm fuses BatchNorm only"
    return None


def _bn_leaky_relu(block: nn.Module, bn: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """``block.lrelu(bn(x))`` on activated_batch_norm with BatchNorm's signed weight; the stock two calls where
    this call cannot (counted with the reason)."""
    reason = None
    uses_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    weight = bn.weight if bn.affine else torch.ones(x.shape[1], dtype=x.dtype, device=x.device)
    bias = bn.bias if bn.affine else torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
    flip = None
    if not uses_batch_stats:
        reason = "eval mode (running statistics)"
    elif not 3 <= x.dim() <= 5:
        reason = f"{x.dim()}-D input (the op takes [B, C, *spatial])"
    elif not fused_kernel_for("activated_batch_norm", x.dtype, x.device, op_backend(block)):
        reason = f"no fused kernel for {_dtype(x.dtype)} on {x.device.type}"
    else:
        flip = signed_weight_plan(weight, bn.eps)
        if flip is None:
            reason = f"a BatchNorm weight within eps ({bn.eps}) of 0: the op's scale cannot represent it"
    if reason is not None:
        count_call(block, reason)
        return block.lrelu(bn(x))
    count_fused(block)
    running_mean, running_var, momentum = running_stats_step(bn)
    return signed_weight_activated_batch_norm(x, weight, bias, bn.eps, block.lrelu.negative_slope, flip,
                                              backend=op_backend(block), running_mean=running_mean,
                                              running_var=running_var, momentum=momentum)[0]


def _basic_block_forward(block: UnetBasicBlock, inp: torch.Tensor) -> torch.Tensor:
    out = _bn_leaky_relu(block, block.norm1, block.conv1(inp))
    return _bn_leaky_relu(block, block.norm2, block.conv2(out))


def _res_block_forward(block: UnetResBlock, inp: torch.Tensor) -> torch.Tensor:
    residual = inp
    out = _bn_leaky_relu(block, block.norm1, block.conv1(inp))
    out = block.norm2(block.conv2(out))
    if hasattr(block, "conv3"):
        residual = block.conv3(residual)
    if hasattr(block, "norm3"):
        residual = block.norm3(residual)
    out += residual
    return block.lrelu(out)


BN_PER_CALL = ("a BatchNorm uses running statistics (eval), has a weight within eps of 0, or the dtype has "
               "no fused kernel (per BatchNorm)")

UNET_BASIC_BLOCK = register_patcher(Patcher(
    name="monai UnetBasicBlock", op="activated_batch_norm", types=(UnetBasicBlock,), forward=_basic_block_forward,
    unsupported=_bn_block_unsupported, per_call=BN_PER_CALL,
    describe=lambda block: f"norm1 + lrelu, norm2 + lrelu ({type(block.norm1).__name__})"))
UNET_RES_BLOCK = register_patcher(Patcher(
    name="monai UnetResBlock", op="activated_batch_norm", types=(UnetResBlock,), forward=_res_block_forward,
    unsupported=_bn_block_unsupported, per_call=BN_PER_CALL,
    describe=lambda block: f"norm1 + lrelu ({type(block.norm1).__name__}); norm2 (before the residual sum) stock"))
