"""Argument validation shared by every public op: each error names the argument and says what was
expected. Shapes and values raise ValueError, dtypes TypeError."""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_tensor(t, name: str, rank: Optional[int] = None, layout: str = "") -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if rank is not None and t.dim() != rank:
        raise ValueError(f"{name}: expected a {rank}-D tensor{' ' + layout if layout else ''}, "
                         f"got shape {tuple(t.shape)}")
    return t


def check_floating(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point tensor, got {_dt(t.dtype)}")


def check_like(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    """Same dtype and device as `ref`."""
    if t.device != ref.device:
        raise ValueError(f"{name}: expected device {ref.device} (as {ref_name}), got {t.device}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {_dt(ref.dtype)} (as {ref_name}), got {_dt(t.dtype)}")


def check_dims(t: torch.Tensor, name: str, expected: Sequence[Optional[int]], what: str) -> None:
    """Each non-None entry of `expected` must equal the matching size of t; `what` describes the
    expected shape for the message, e.g. '[B, H, Nq] matching q'."""
    if t.dim() != len(expected) or any(e is not None and s != e for s, e in zip(t.shape, expected)):
        raise ValueError(f"{name}: expected shape {what}, got {tuple(t.shape)}")


def check_scale(scale, name: str = "scale") -> Optional[float]:
    if scale is None:
        return None
    if isinstance(scale, torch.Tensor) or not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"{name}: expected a Python float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"{name}: expected a finite float, got {scale}")
    return float(scale)


def check_int_pair(value, name: str, minimum: int) -> tuple:
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)):
        pair = tuple(value)
    else:
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) for v in pair):
        raise TypeError(f"{name}: expected an int or a pair of ints, got {value!r}")
    if any(v < minimum for v in pair):
        raise ValueError(f"{name}: expected values >= {minimum}, got {value!r}")
    return pair


# ---- feature maps [B, C, *spatial]: the per-pixel ops (global spatial attention, activated batch norm) take
# 1 to 3 spatial dims; their kernels see one 4-D layout.
SPATIAL_MAP = "[B, C, *spatial] with 1 to 3 spatial dims"


def check_spatial_map(t, name: str) -> torch.Tensor:
    check_tensor(t, name)
    if not 3 <= t.dim() <= 5:
        raise ValueError(f"{name}: expected a 3-D, 4-D or 5-D tensor {SPATIAL_MAP}, got shape {tuple(t.shape)}")
    return t


def as_4d_map(t: torch.Tensor) -> torch.Tensor:
    """`t` [B, C, *spatial] as the [B, C, 1, P] (P = prod(spatial)) that the 4-D kernels take, without a copy
    for the layouts they read in place: the spatial dims merge into one in NC(D)HW and in channels_last(_3d)
    alike (each spatial stride is the next one's times its size), so channels_last_3d arrives as channels_last;
    other striding is copied by reshape, as the kernels would copy it anyway. The per-pixel ops compute the
    same function on this view (their reductions run over all pixels, or over channels only).
    All pixels go in the last dim because the kernels take stride(3) as the pixel stride of a channels_last
    map; a [B, C, H, 1] tensor may carry any stride for its size-1 W and still count as channels_last.
    A 4-D map with W > 1 is returned as it is: the kernels read it alike, and on a tensor that requires grad
    the view and the one back (`from_4d_map`) are autograd nodes, 30 us a call at a U-Net's small maps."""
    if t.dim() == 4 and t.shape[3] > 1:
        return t
    return t.reshape(t.shape[0], t.shape[1], 1, math.prod(t.shape[2:]))


def from_4d_map(out: torch.Tensor, t: torch.Tensor, t_map: torch.Tensor) -> torch.Tensor:
    """A kernel's output `out` on `t_map = as_4d_map(t)`, in t's shape."""
    return out if t_map is t else out.view(t.shape)
