"""Layer calls at a U-Net's small maps, where the Python around a kernel costs as much as the kernel.

At DIN's deep stages at 96 px a kernel runs for tens of microseconds, so what a call costs is decided by
what surrounds it: argument checks, backend choice, the autograd node, views, and for the activated batch
norm module the running-statistics update. The op tables (`medattn bench`) time one call per round at
large maps; here each round is `--calls` back-to-back fwd+bwd calls of one layer, the layers and their
PyTorch counterparts alternating round by round (harness.time_interleaved), medians of the rounds.

`python benchmarks/bench_small_maps.py --help`; not collected by pytest-benchmark.
"""
from __future__ import annotations

import argparse
import json
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import bidirectional_cross_attention, depthwise_conv2d, global_spatial_attention
from ..nn import ActivatedBatchNorm2d
from ..testing import make_tensor
from .harness import device_name, keep_freed_memory, time_interleaved

# (8, C, S, S): the activated batch norm's inputs in DIN at 96 px, batch 8 (demo widths), from the first
# stage down to the bottleneck.
ABN_SHAPES = [(8, 12, 96, 96), (8, 16, 48, 48), (8, 24, 48, 48), (8, 32, 24, 24), (8, 48, 12, 12)]
SMALL_MAP = (8, 48, 12, 12)


def _fwd_bwd(fn: Callable[[], torch.Tensor], grad: torch.Tensor) -> Callable[[], None]:
    return lambda: fn().backward(grad)


def layer_pairs() -> List[Tuple[str, str, Callable[[], None], Callable[[], None]]]:
    """(layer, PyTorch counterpart, our fwd+bwd call, theirs), fresh random inputs."""
    pairs = []
    for shape in ABN_SHAPES:
        ours, theirs = ActivatedBatchNorm2d(shape[1]), nn.BatchNorm2d(shape[1])
        x = make_tensor(shape, torch.float32, "cpu", requires_grad=True)
        grad = torch.randn(shape)
        pairs.append((f"ActivatedBatchNorm2d {shape}", "BatchNorm2d + leaky_relu",
                      _fwd_bwd(lambda ours=ours, x=x: ours(x), grad),
                      _fwd_bwd(lambda theirs=theirs, x=x: F.leaky_relu(theirs(x), 0.01), grad)))
    x = make_tensor(SMALL_MAP, torch.float32, "cpu", requires_grad=True)
    grad = torch.randn(SMALL_MAP)
    pairs.append((f"global_spatial_attention {SMALL_MAP}", "x * sigmoid(x.mean(1))",
                  _fwd_bwd(lambda: global_spatial_attention(x), grad),
                  _fwd_bwd(lambda: x * torch.sigmoid(x.mean(1, keepdim=True)), grad)))
    weight = make_tensor((SMALL_MAP[1], 1, 7, 7), torch.float32, "cpu", requires_grad=True)
    x_cl = make_tensor(SMALL_MAP, torch.float32, "cpu", layout="channels_last", requires_grad=True)
    for layout, inp in (("NCHW", x), ("channels_last", x_cl)):
        pairs.append((f"depthwise_conv2d 7x7 {SMALL_MAP} {layout}", f"F.conv2d {layout}",
                      _fwd_bwd(lambda inp=inp: depthwise_conv2d(inp, weight), grad),
                      _fwd_bwd(lambda inp=inp: F.conv2d(inp, weight, padding=3, groups=SMALL_MAP[1]), grad)))
    # DIFM at the bottleneck: 7 x 7 tokens, head dim 48, both directions
    q_a, k_a, v_a, q_b, k_b, v_b = (make_tensor((8, 1, 49, 48), torch.float32, "cpu", requires_grad=True)
                                    for _ in range(6))
    grad_o = torch.randn(8, 1, 49, 48)

    def ours_attention():
        o_a, o_b = bidirectional_cross_attention(q_a, k_a, v_a, q_b, k_b, v_b)[:2]
        torch.autograd.backward([o_a, o_b], [grad_o, grad_o])

    def sdpa_attention():
        o_a = F.scaled_dot_product_attention(q_a, k_b, v_b)
        o_b = F.scaled_dot_product_attention(q_b, k_a, v_a)
        torch.autograd.backward([o_a, o_b], [grad_o, grad_o])

    pairs.append(("bidirectional_cross_attention B8 N49 D48", "2x F.sdpa", ours_attention, sdpa_attention))
    return pairs


def _repeated(fn: Callable[[], None], calls: int) -> Callable[[], None]:
    def run():
        for _ in range(calls):
            fn()
    return run


def compare(calls: int = 50, rounds: int = 15) -> List[Dict[str, object]]:
    rows = []
    for layer, counterpart, ours, theirs in layer_pairs():
        ms = time_interleaved({"ours": _repeated(ours, calls), "theirs": _repeated(theirs, calls)}, "cpu",
                              warmup=2, reps=rounds, budget_s=30.0)
        us_ours, us_theirs = ms["ours"] * 1e3 / calls, ms["theirs"] * 1e3 / calls
        rows.append({"layer": layer, "counterpart": counterpart, "ours_us": us_ours, "counterpart_us": us_theirs,
                     "speedup": us_theirs / us_ours})
        print(f"{layer:52s} {us_ours:8.1f} us   {counterpart:26s} {us_theirs:8.1f} us   x{us_theirs / us_ours:.2f}",
              flush=True)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="bench_small_maps", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--calls", type=int, default=50, help="fwd+bwd calls per timed round")
    p.add_argument("--rounds", type=int, default=15, help="timed rounds per layer (median reported)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", default=None, help="write the rows and the machine here")
    args = p.parse_args(argv)
    for name in ("calls", "rounds", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name}: expected >= 1, got {getattr(args, name)}")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    allocator = keep_freed_memory()  # as the op tables: repeated calls reuse warm pages
    machine = device_name("cpu")
    print(f"{machine}; fp32, each row: median over {args.rounds} rounds of {args.calls} fwd+bwd calls, "
          "interleaved with its counterpart; ratio = counterpart time / ours")
    if allocator:
        print(f"allocator: {allocator}")
    rows = compare(args.calls, args.rounds)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": machine, "torch": torch.__version__, "allocator": allocator, "calls": args.calls,
                       "rounds": args.rounds, "rows": rows}, fh, indent=1)
    return 0
