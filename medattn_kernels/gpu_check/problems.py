"""The problems the check compiles for, and how their launches are recorded.

A problem runs one op (or a whole network's training step) forward and backward on *meta* tensors
(shapes, strides and dtypes, no data, no memory) with the ops taking their GPU (Triton) path; the
launchers run as they would on a GPU, except that `record_launches()` keeps their launches instead of
running them. So what the check compiles is exactly what the launchers launch for that problem.

The grid:
* bench: every case of every benchmark module (medattn_kernels/bench/<op>.py, the full-size shapes),
  run through its fused candidate, in each GPU dtype; fp32 attention also with TF32 off
  (MEDATTN_TRITON_TF32=0, the IEEE fp32 path);
* sweeps: head dims 16..256 (aligned and unaligned, Dv != D; contiguous and as token views of feature
  maps) for the attention ops, gated or not; depthwise kernels 3x3..63x63, 51x5 / 5x51 strips and
  dilations, NCHW and channels_last; channels_last maps for global spatial attention and activated
  batch norm;
* networks: the training step (forward, loss, backward) of the five reference networks at 224 and 512
  px, in their default and demo configurations, in fp32. Depthwise convolutions there take the Triton
  path even where the CUDA C++ kernel serves them by default (KH*KW >= 81): Triton is a valid explicit
  backend for every kernel size.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator, List, Sequence

import torch

from .. import ops as medattn_ops
from ..ops._registry import FusedOp, force_reference
from ..testing import make_tensor

GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ATTENTION_OPS = ("cross_attention", "bidirectional_cross_attention", "tied_cross_attention")
# (D, Dv): every head-dim width (16, 32, 64, 128, 256) at its widest, unaligned head dims (rows not 16-byte
# aligned: other specializations, more registers), the networks' 96, Dv != D both ways; token views (the
# networks' layout) at the widths the networks use and the widest
HEAD_DIMS = ((16, 16), (24, 24), (64, 64), (72, 72), (96, 96), (128, 128), (200, 200), (256, 256), (64, 128),
             (128, 64))
TOKEN_HEAD_DIMS = ((24, 24), (64, 64), (96, 96), (128, 128), (256, 256))
GATED_HEAD_DIMS = ((16, 16), (64, 64), (128, 128), (256, 256))  # the gate only adds an epilogue
DEPTHWISE_KERNELS = tuple((k, k) for k in range(3, 64, 2)) + ((51, 5), (5, 51))
DEPTHWISE_DILATED = (((3, 3), (2, 2)), ((7, 7), (3, 3)), ((21, 21), (2, 2)), ((5, 1), (4, 1)))
NETWORK_SIZES = (224, 512)
NETWORK_DTYPES = (torch.float32,)
NETWORK_BATCH = 2


@dataclass
class Problem:
    op: str  # the op, or "network:<name>"
    label: str
    run: Callable[[], None]  # forward and backward on meta tensors


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ------------------------------------------------------------------------------------------ recording
@contextlib.contextmanager
def _meta_tensors_take_gpu_path() -> Iterator[None]:
    """Ops called on meta tensors resolve to their Triton kernels (as CUDA tensors would on a GPU),
    whatever backend the caller names, except the reference."""
    original = FusedOp.resolve

    def resolve(self, backend, tensor, name="input"):
        if tensor.device.type != "meta" or backend == "reference" or force_reference():
            return original(self, backend, tensor, name)
        if self.triton is None:
            raise RuntimeError(f"{self.name}: no Triton kernel to check")
        if tensor.dtype not in self.gpu_dtypes:
            raise TypeError(f"{name}: {self.name} on the GPU supports {self.gpu_dtypes}, got {tensor.dtype}")
        return "triton"

    FusedOp.resolve = resolve
    try:
        yield
    finally:
        FusedOp.resolve = original


@contextlib.contextmanager
def _ieee_fp32_attention() -> Iterator[None]:
    """MEDATTN_TRITON_TF32=0: the attention kernels multiply fp32 in IEEE fp32."""
    from ..triton import cross_attention

    saved = cross_attention.ALLOW_TF32
    cross_attention.ALLOW_TF32 = False
    try:
        yield
    finally:
        cross_attention.ALLOW_TF32 = saved


def record(problem: Problem) -> list:
    """The launches of one problem (a list of triton._common.Launch)."""
    from ..triton._common import record_launches

    with _meta_tensors_take_gpu_path(), record_launches() as launches:
        problem.run()
    return launches


def _forward_backward(fn: Callable, inputs: dict) -> None:
    """fn(**inputs) without autograd, then forward + backward (the harness's own callables)."""
    from ..bench.harness import Candidate, forward_backward_callable, forward_callable

    candidate = Candidate("gpu_check", fn)
    forward_callable(candidate, inputs)()
    forward_backward_callable(candidate, inputs)  # builds the callable and runs one forward + backward


def _precisions(op: str, dtype: torch.dtype):
    """(label suffix, context) per precision mode the op has in this dtype."""
    yield "", contextlib.nullcontext
    if op in ATTENTION_OPS and dtype == torch.float32:
        yield " MEDATTN_TRITON_TF32=0", _ieee_fp32_attention


def _problem(op: str, label: str, dtype: torch.dtype, fn: Callable, make_inputs: Callable[[], dict]):
    for suffix, context in _precisions(op, dtype):
        def run(context=context):
            with context():
                _forward_backward(fn, make_inputs())
        yield Problem(op, f"{label} {_dtype_name(dtype)}{suffix}", run)


# ------------------------------------------------------------------------------------------ sources
def bench_problems(dtypes: Sequence[torch.dtype] = GPU_DTYPES) -> List[Problem]:
    """Every benchmark case (full size) through its fused candidates."""
    from ..bench import op_modules

    out = []
    for module in op_modules().values():
        for dtype in dtypes:
            for case in module.cases("meta", dtype, False):
                for cand in case.candidates:
                    if cand.kind == "fused":
                        out += _problem(case.op, f"bench {case.op} {case.shape}", dtype, cand.fn, case.make_inputs)
    return out


def attention_sweep(dtypes: Sequence[torch.dtype] = GPU_DTYPES) -> List[Problem]:
    """Bidirectional (the two-direction launches that cross_attention's one-direction launches share) and tied
    attention at every head-dim width, contiguous [B, H, N, D] and as the networks' token views of feature
    maps (to_tokens: tokens unit-stride, head dims HW apart); gated cross attention."""
    from ..nn.attention import to_tokens

    b, h, (na, map_a), (nb, map_b) = 2, 2, (1000, (25, 40)), (777, (21, 37))

    def token_maker(dtype, layout, d, dv):
        def tokens(*spec, gate=False):
            """{name: [b, h, n, d or dv] tokens} for (name, side a?, value-width?) in spec."""
            out = {}
            for name, side_a, is_value in spec:
                n, hw, width = (na, map_a, dv if is_value else d) if side_a else (nb, map_b, dv if is_value else d)
                if layout == "tokens":
                    out[name] = to_tokens(make_tensor((b, h * width) + hw, dtype, "meta", requires_grad=True), h)
                else:
                    out[name] = make_tensor((b, h, n, width), dtype, "meta", requires_grad=True)
            if gate:
                out["gate"] = make_tensor((b, h, na), dtype, "meta", requires_grad=True)
            return out
        return tokens

    out = []
    for dtype in dtypes:
        for layout, dims in (("contiguous", HEAD_DIMS), ("tokens", TOKEN_HEAD_DIMS)):
            for d, dv in dims:
                shape = f"{layout} B{b} H{h} Na{na} Nb{nb} D{d} Dv{dv}"
                tokens = token_maker(dtype, layout, d, dv)
                if layout == "contiguous" and (d, dv) in GATED_HEAD_DIMS:
                    out += _problem("cross_attention", f"sweep cross_attention {shape} gated", dtype,
                                    medattn_ops.cross_attention, lambda tokens=tokens: tokens(
                                        ("q", True, False), ("k", False, False), ("v", False, True), gate=True))
                out += _problem("bidirectional_cross_attention", f"sweep bidirectional {shape}", dtype,
                                medattn_ops.bidirectional_cross_attention, lambda tokens=tokens: tokens(
                                    ("q_a", True, False), ("k_a", True, False), ("v_a", True, True),
                                    ("q_b", False, False), ("k_b", False, False), ("v_b", False, True)))
                out += _problem("tied_cross_attention", f"sweep tied {shape}", dtype, medattn_ops.tied_cross_attention,
                                lambda tokens=tokens: tokens(("r_a", True, False), ("v_a", True, True),
                                                             ("r_b", False, False), ("v_b", False, True)))
    return out


def map_sweep(dtypes: Sequence[torch.dtype] = GPU_DTYPES) -> List[Problem]:
    """Depthwise kernel sizes and dilations; channels_last maps for the map ops."""
    bsz, c, hw = 2, 32, 56
    out = []
    for dtype in dtypes:
        for layout in ("contiguous", "channels_last"):
            convs = [(k, (1, 1)) for k in DEPTHWISE_KERNELS] + list(DEPTHWISE_DILATED)
            for (kh, kw), dil in convs:
                def conv(kh=kh, kw=kw, layout=layout, dtype=dtype):
                    return {"x": make_tensor((bsz, c, hw, hw), dtype, "meta", layout, requires_grad=True),
                            "weight": make_tensor((c, 1, kh, kw), dtype, "meta", requires_grad=True),
                            "bias": make_tensor((c,), dtype, "meta", requires_grad=True)}

                out += _problem("depthwise_conv2d", f"sweep depthwise ({bsz}, {c}, {hw}, {hw}) {layout} k{kh}x{kw} "
                                f"dilation {dil[0]}x{dil[1]}", dtype,
                                lambda x, weight, bias, dil=dil: medattn_ops.depthwise_conv2d(x, weight, bias,
                                                                                              dilation=dil), conv)
            if layout == "channels_last":
                def maps(dtype=dtype, two=False):
                    x = make_tensor((bsz, c, hw, hw), dtype, "meta", layout, requires_grad=True)
                    y = make_tensor(x.shape, dtype, "meta", layout, requires_grad=True) if two else None
                    return {"x": x, "y": y}

                def abn(dtype=dtype):
                    return {"x": make_tensor((bsz, c, hw, hw), dtype, "meta", layout, requires_grad=True),
                            "weight": make_tensor((c,), dtype, "meta", requires_grad=True),
                            "bias": make_tensor((c,), dtype, "meta", requires_grad=True)}

                label = f"({bsz}, {c}, {hw}, {hw}) {layout}"
                out += _problem("global_spatial_attention", f"sweep gsa {label}", dtype,
                                medattn_ops.global_spatial_attention, maps)
                out += _problem("global_spatial_attention", f"sweep gsa x+y {label}", dtype,
                                medattn_ops.global_spatial_attention, lambda dtype=dtype: maps(dtype, True))
                out += _problem("activated_batch_norm", f"sweep activated_batch_norm {label}", dtype,
                                lambda **kw: medattn_ops.activated_batch_norm(**kw)[0], abn)
    return out


def network_problems(dtypes: Sequence[torch.dtype] = NETWORK_DTYPES,
                     sizes: Sequence[int] = NETWORK_SIZES) -> List[Problem]:
    """The training step of each reference network, default and demo configurations (fp32, as they train
    here; every op's fp16 / bf16 specializations come from the bench and sweep problems)."""
    from ..models import NETWORKS, build_model
    from ..train import DEFAULT_MODEL_KWARGS

    out = []
    for name in NETWORKS:
        configs = [("default", {})]
        if DEFAULT_MODEL_KWARGS.get(name):
            configs.append(("demo", DEFAULT_MODEL_KWARGS[name]))
        for config, kwargs in configs:
            for dtype in dtypes:
                for size in sizes:
                    def run(name=name, kwargs=kwargs, dtype=dtype, size=size):
                        model = build_model(name, fused=True, **kwargs).to(device="meta", dtype=dtype)
                        image = torch.empty(NETWORK_BATCH, 1, size, size, dtype=dtype, device="meta")
                        batch = {"image": image, "enhanced": torch.empty_like(image),
                                 "label": torch.zeros(NETWORK_BATCH, size, size, dtype=torch.int64, device="meta")}
                        loss, _ = model.training_loss(batch)
                        loss.backward()

                    out.append(Problem(f"network:{name}", f"network {name} ({config}) {size}px batch {NETWORK_BATCH} "
                                       f"{_dtype_name(dtype)}", run))
    return out


def all_problems() -> List[Problem]:
    return bench_problems() + attention_sweep() + map_sweep() + network_problems()
