"""medattn_kernels.gpu_check and the launch plans it checks: the launchers' plans (recorded on meta
tensors: tiles per head dim and dtype, grids covering the problem), the problem grid reaching every
Triton kernel, the JIT-faithful specialization, and the check's failure detection (shared memory over the
limit, register spills, compile errors: real compiles of small kernels for sm_90, no GPU needed)."""
import importlib
import os
import pkgutil

import pytest
import torch

triton = pytest.importorskip("triton", reason="triton is not installed (the GPU compile check needs it)")
import triton.language as tl  # noqa: E402

import medattn_kernels.triton as triton_kernels  # noqa: E402
from medattn_kernels.gpu_check import Problem, judge, run  # noqa: E402
from medattn_kernels.gpu_check.check import Row  # noqa: E402
from medattn_kernels.gpu_check.cuda_cpp import parse  # noqa: E402
from medattn_kernels.gpu_check.problems import all_problems, bench_problems, record  # noqa: E402
from medattn_kernels.gpu_check.targets import TARGETS  # noqa: E402
from medattn_kernels.gpu_check.triton_compile import (Resources, compile_one, parse_ptxas_log,  # noqa: E402
                                                      specialize)
from medattn_kernels.testing import make_tensor  # noqa: E402
from medattn_kernels.triton import cross_attention as ca  # noqa: E402
from medattn_kernels.triton import depthwise_conv2d as dw  # noqa: E402
from medattn_kernels.triton._common import AcceptedSpill, launch, record_launches  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET", "0") == "1",
                                reason="the GPU compile check runs without TRITON_INTERPRET (compiled kernels)")
GPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SM90 = TARGETS[90]


def meta(shape, dtype=torch.float32, layout="contiguous"):
    return make_tensor(shape, dtype, "meta", layout, requires_grad=False)


def cdiv(a, b):
    return -(-a // b)


# ------------------------------------------------------------------------------------------ launch plans
@pytest.mark.parametrize("dtype", GPU_DTYPES)
@pytest.mark.parametrize("nq, nk, d, dv", [(37, 53, 16, 16), (1000, 777, 24, 40), (3136, 3136, 96, 96),
                                           (300, 1, 128, 64), (65, 129, 200, 256)])
def test_attention_plan_tiles_and_grids(dtype, nq, nk, d, dv):
    b, h = 2, 3
    q, k, v = meta((b, h, nq, d), dtype), meta((b, h, nk, d), dtype), meta((b, h, nk, dv), dtype)
    with record_launches() as launches:
        out, lse = ca.cross_attention_forward(q, k, v)
        ca.cross_attention_backward(torch.empty_like(out), q, k, v, out, lse)
    assert [x.name for x in launches] == ["_fwd_kernel", "_bwd_kernel", "_bwd_kernel"]
    assert [x.constexprs["OWN_KEYS"] for x in launches[1:]] == [True, False]
    for x, kernel, owned in zip(launches, ("forward", "backward_kv", "backward_q"), (nq, nk, nq)):
        plan = ca.tiles(kernel, d, dv, dtype)
        c = x.constexprs
        assert (c["BLOCK_M"], c["BLOCK_N"], x.num_warps, x.num_stages) == \
            (plan.block_m, plan.block_n, plan.num_warps, plan.num_stages)
        assert c["BLOCK_D"] >= max(d, 16) and c["BLOCK_DV"] >= max(dv, 16)
        assert c["BLOCK_D"] == triton.next_power_of_2(c["BLOCK_D"]) and c["BLOCK_D"] < 2 * max(d, 16)
        block = c["BLOCK_N"] if kernel == "backward_kv" else c["BLOCK_M"]
        assert x.grid == (cdiv(owned, block), b * h, 1), kernel  # every token block once, no empty program
        assert c["PRECISION"] == ("tf32" if dtype == torch.float32 else "ieee")


def test_attention_plan_ieee_fp32_has_its_own_tiles(monkeypatch):
    q = meta((1, 1, 100, 128))
    with record_launches() as tf32:
        ca.cross_attention_forward(q, q, q)
    monkeypatch.setattr(ca, "ALLOW_TF32", False)
    with record_launches() as ieee:
        ca.cross_attention_forward(q, q, q)
    assert ca.operand_class(torch.float32) == "ieee"
    assert ieee[0].constexprs["PRECISION"] == "ieee" and tf32[0].constexprs["PRECISION"] == "tf32"
    plan = ca.tiles("forward", 128, 128, torch.float32)
    assert (ieee[0].constexprs["BLOCK_M"], ieee[0].num_warps) == (plan.block_m, plan.num_warps)
    assert plan == ca._TILES["forward"]["ieee"][128]


def test_two_direction_launches_cover_the_longer_side():
    qa, qb = meta((2, 1, 100, 64)), meta((2, 1, 3000, 64))
    with record_launches() as launches:
        ca.bidirectional_forward(qa, qa, qa, qb, qb, qb)
        ca.tied_backward(meta((2, 1, 100, 64)), meta((2, 1, 3000, 64)), qa, qa, qb, qb, meta((2, 1, 100, 64)),
                         meta((2, 1, 3000, 64)), meta((2, 1, 100)), meta((2, 1, 3000)))
    fwd, rows, cols = launches
    assert fwd.grid == (cdiv(3000, fwd.constexprs["BLOCK_M"]), 2, 2)
    # one kernel, launched once per side: side a's 100 tokens own the row blocks, side b's 3000 the columns
    assert rows.name == cols.name == "_tied_side_kernel" and rows.constexprs == cols.constexprs
    assert rows.grid == (cdiv(100, rows.constexprs["BLOCK_M"]), 2)
    assert cols.grid == (cdiv(3000, cols.constexprs["BLOCK_M"]), 2)
    assert rows.args[3] is cols.args[8] and cols.args[3] is rows.args[8]  # r_a owns, then streams


@pytest.mark.parametrize("dtype, warps", [(torch.float32, 8), (torch.bfloat16, 4)])  # IEEE fp32 on FMAs: 8
@pytest.mark.parametrize("k, dilation", [((3, 3), (1, 1)), ((31, 31), (1, 1)), ((51, 5), (1, 1)),
                                         ((63, 63), (1, 1)), ((7, 7), (3, 3))])
def test_depthwise_plan_grids(k, dilation, dtype, warps):
    x, w = meta((2, 5, 57, 70), dtype), meta((5, 1) + k, dtype)
    pad = [dilation[i] * (k[i] - 1) // 2 for i in range(2)]
    with record_launches() as launches:
        out = dw.forward(x, w, None, pad, list(dilation))
        dw.backward(torch.empty_like(out), x, w, pad, list(dilation), [True, True, False])
    fwd, grad_x, grad_w = launches
    for launch_ in (fwd, grad_x):
        c = launch_.constexprs
        assert launch_.grid == (10, cdiv(out.shape[2], c["BLOCK_H"]) * cdiv(out.shape[3], c["BLOCK_W"]))
        assert c["BLOCK_WP"] >= c["BLOCK_W"] + dilation[1] * (k[1] - 1)  # the tile's reach
    assert grad_w.grid == (5, k[0], cdiv(out.shape[3], grad_w.constexprs["BLOCK_W"]))
    assert {x.num_warps for x in launches} == {warps} and {x.constexprs["IEEE"] for x in launches} == {warps == 8}
    # the IEEE fp32 correlation pipelines 2 deep (3 spilled on sm_90), the weight gradient 3 deep
    assert (fwd.num_stages, grad_x.num_stages, grad_w.num_stages) == ((2, 2, 3) if warps == 8 else (3, 3, 3))


def test_nothing_launches_for_empty_problems():
    with record_launches() as launches:
        ca.cross_attention_forward(meta((0, 2, 10, 16)), meta((0, 2, 10, 16)), meta((0, 2, 10, 16)))
        dw.forward(meta((2, 0, 8, 8)), meta((0, 1, 3, 3)), None, [1, 1], [1, 1])
    assert launches == []


def _jit_kernels():
    """Every @triton.jit `*_kernel` of medattn_kernels/triton/*.py (the launchable ones)."""
    found = set()
    for info in pkgutil.iter_modules(triton_kernels.__path__):
        module = importlib.import_module(f"{triton_kernels.__name__}.{info.name}")
        found |= {name for name, obj in vars(module).items()
                  if isinstance(obj, triton.runtime.JITFunction) and name.endswith("_kernel")}
    return found


def test_problem_grid_reaches_every_triton_kernel():
    launched = {x.name for p in bench_problems() for x in record(p)}
    assert _jit_kernels() - launched == set()


def test_specialization_is_the_jits():
    q = meta((2, 1, 3136, 96), torch.float16)  # H = 1 and unit strides become constexprs, 16-aligned ints
    with record_launches() as launches:
        ca.cross_attention_forward(q, q, q)
    spec = specialize(launches[0], SM90)
    assert spec.signature["Q0"] == "*fp16" and spec.dtype() == "fp16"
    names = [p.name for p in ca._fwd_kernel.params]
    assert spec.constexprs[(names.index("H"),)] == 1 and spec.constexprs[(names.index("sqd0"),)] == 1
    assert spec.attrs[(names.index("Q0"),)] == [["tt.divisibility", 16]]  # aligned pointer
    assert spec.attrs[(names.index("sqn0"),)] == [["tt.divisibility", 16]]  # 96 % 16 == 0
    assert spec.named_constexprs()["BLOCK_D"] == 128 and "H" not in spec.named_constexprs()
    assert (spec.options["num_warps"], spec.options["num_stages"]) == (launches[0].num_warps, launches[0].num_stages)


# ------------------------------------------------------------------------------------------ failure detection
@triton.jit
def _tile_product_kernel(a_ptr, b_ptr, c_ptr, K, BLOCK: tl.constexpr, BLOCK_K: tl.constexpr):
    # C = A B for one BLOCK x BLOCK tile, streaming K in BLOCK_K steps (pipelined: shared memory per stage)
    rows = tl.arange(0, BLOCK)
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK, BLOCK], tl.float32)
    for k in range(0, K, BLOCK_K):
        a = tl.load(a_ptr + rows[:, None] * K + k + ks[None, :])
        b = tl.load(b_ptr + (k + ks[:, None]) * BLOCK + rows[None, :])
        acc += tl.dot(a, b)
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


@triton.jit
def _held_tile_kernel(x_ptr, y_ptr, steps, BLOCK: tl.constexpr):
    # keeps a BLOCK x BLOCK fp32 tile and its running product live across a loop: registers per thread
    # grow as BLOCK^2 / threads
    offs = tl.arange(0, BLOCK)
    x = tl.load(x_ptr + offs[:, None] * BLOCK + offs[None, :])
    acc = x
    for _ in range(steps):
        acc = acc * x + 1.0
    tl.store(y_ptr + offs[:, None] * BLOCK + offs[None, :], acc + x)


def _problem(kernel, grid, args, constexprs, num_warps, num_stages, label):
    return Problem("test", label, lambda: launch(kernel, grid, args, constexprs, num_warps, num_stages))


def _check(*problems):
    return run(list(problems), archs=(90,), jobs=1, cuda=False, log=lambda *_: None)


# specializations that spilled on sm_90 (issue 12: the first full check, and the re-tuning's candidate
# tiles on unaligned head dims), fixed in the launch plans: (problem, kernel). The problems' odd head dims
# and strided layouts change the JIT's argument specialization, hence the registers.
FORMERLY_SPILLING = [
    ("sweep bidirectional contiguous B2 H2 Na1000 Nb777 D64 Dv128 bfloat16", "_bwd_kernel"),
    ("sweep bidirectional contiguous B2 H2 Na1000 Nb777 D72 Dv72 float16", "_bwd_kernel"),
    ("bench bidirectional_cross_attention B2 H1 N12544 D96 float32 MEDATTN_TRITON_TF32=0", "_bwd_kernel"),
    ("sweep bidirectional tokens B2 H2 Na1000 Nb777 D256 Dv256 float32", "_bwd_kernel"),
    ("sweep depthwise (2, 32, 56, 56) contiguous k3x3 dilation 2x2 float32", "_dw_correlate_kernel"),
    ("sweep tied contiguous B2 H2 Na1000 Nb777 D128 Dv64 bfloat16", "_tied_side_kernel"),
    ("sweep tied contiguous B2 H2 Na1000 Nb777 D72 Dv72 float16", "_tied_side_kernel"),
    ("sweep tied tokens B2 H2 Na1000 Nb777 D256 Dv256 float32 MEDATTN_TRITON_TF32=0", "_tied_side_kernel"),
    ("sweep tied tokens B2 H2 Na1000 Nb777 D64 Dv64 float32", "_tied_side_kernel"),
    # found after the merge with the DIN DIFM benchmark case (strided token views, TF32 off)
    ("bench bidirectional_cross_attention DIN 224px DIFM x4 (B8, N 3136..49, D 16..48, views) float32 "
     "MEDATTN_TRITON_TF32=0", "_bwd_kernel"),
]


@pytest.mark.parametrize("label, kernel", FORMERLY_SPILLING)
def test_formerly_spilling_specializations_compile_without_spills(label, kernel, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # a cached kernel has no ptxas log
    problem, = [p for p in all_problems() if p.label == label]
    specs = {}
    for launch_ in record(problem):
        if launch_.kernel.fn.__name__ == kernel:
            spec = specialize(launch_, SM90)
            specs[spec.key] = spec
    assert specs
    for spec in specs.values():
        res = compile_one(spec)
        assert res.error is None, res.error
        assert (res.spill_stores, res.spill_loads) == (0, 0), (spec.named_constexprs(), res)
        assert res.shared <= SM90.max_shared


def test_check_reports_shared_memory_over_the_limit_and_passes_a_fitting_config():
    a, c = meta((256, 4096), torch.float16), meta((256, 256), torch.float32)
    report = _check(
        _problem(_tile_product_kernel, (1,), (a, meta((4096, 256), torch.float16), c, 4096),
                 dict(BLOCK=256, BLOCK_K=128), 8, 3, "oversized"),
        _problem(_tile_product_kernel, (1,), (a, meta((4096, 64), torch.float16), meta((64, 64)), 4096),
                 dict(BLOCK=64, BLOCK_K=32), 4, 2, "fits"))
    by_label = {r.problems[0]: r for r in report.rows}
    big, small = by_label["oversized"], by_label["fits"]
    assert big.res.shared > SM90.max_shared
    assert big.failure.startswith("shared memory") and str(SM90.max_shared) in big.failure
    assert small.failure is None and 0 < small.res.shared <= SM90.max_shared
    assert report.failures == [big]


def test_check_reports_spills_unless_accepted():
    # one warp holding two 64 x 64 fp32 tiles: 256 values per thread, more than its 255 registers
    x = meta((64, 64))
    report = _check(_problem(_held_tile_kernel, (1,), (x, meta((64, 64)), 10), dict(BLOCK=64), 1, 1, "spills"))
    row, = report.rows
    assert row.spills > 0 and row.failure.startswith("spills") and row.accepted is None
    accepted = [AcceptedSpill("_held_tile_kernel", {"BLOCK": 64}, "a test's deliberate spill", "fp32")]
    for other in (AcceptedSpill("_held_tile_kernel", {"BLOCK": 32}, "other tile"),
                  AcceptedSpill("_held_tile_kernel", {"BLOCK": 64}, "other dtype", "fp16"),
                  AcceptedSpill("_held_tile_kernel", {"BLOCK": 64}, "bounded", max_bytes=row.spills - 1)):
        assert judge(row, [other]).startswith("spills"), other.reason
    assert judge(row, accepted) is None and row.accepted == "a test's deliberate spill"


def test_check_reports_compile_errors():
    a = meta((16, 16), torch.float16)
    report = _check(_problem(_tile_product_kernel, (1,), (a, a, meta((16, 16)), 16), dict(BLOCK=16, BLOCK_K=8), 4,
                             1, "dot with K = 8"))
    row, = report.rows
    assert row.failure.startswith("compile error") and row.res.registers is None


def _row(**res):
    return Row("triton", "k", SM90, "fp32", {"BLOCK": 64}, 8, 2, Resources(**res))


def test_judge_rules():
    ok = dict(shared=1024, registers=128, spill_stores=0, spill_loads=0)
    assert judge(_row(**ok)) is None
    assert judge(_row(**dict(ok, shared=SM90.max_shared + 1))).startswith("shared memory")
    assert judge(_row(**dict(ok, shared=SM90.max_shared))) is None
    # 16 warps x 32 threads x 255 registers > 65536: the launch would fail for lack of registers
    assert "register file" in judge(_row(**dict(ok, registers=255, num_warps=16)))
    assert judge(_row(**dict(ok, spill_stores=8, spill_loads=8))).startswith("spills")
    assert judge(_row(error="boom")).startswith("compile error")


def test_parse_ptxas_logs():
    log = ("ptxas info    : Compiling entry function '_fwd_kernel' for 'sm_90a'\n"
           "ptxas info    : Function properties for _fwd_kernel\n"
           "    16 bytes stack frame, 40 bytes spill stores, 20 bytes spill loads\n"
           "ptxas info    : Used 255 registers, used 1 barriers, 16 bytes cumulative stack size\n")
    assert parse_ptxas_log(log) == (255, 40, 20)
    assert parse_ptxas_log("nothing") == (None, None, None)
    cuda_log = (
        "ptxas info    : Compiling entry function '_Z1kIfEvPT_' for 'sm_90'\n"
        "ptxas info    : Function properties for _Z1kIfEvPT_\n"
        "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
        "ptxas info    : Used 10 registers, used 1 barriers, 1024 bytes smem\n"
        "ptxas info    : Compiling entry function '_Z1kIdEvPT_' for 'sm_80'\n"
        "ptxas info    : Function properties for _Z1kIdEvPT_\n"
        "    8 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads\n"
        "ptxas info    : Used 12 registers, used 1 barriers, 360 bytes cmem[0]\n")
    first, second = parse(cuda_log)
    assert (first.arch, first.registers, first.static_shared, first.spill_stores) == ("sm_90", 10, 1024, 0)
    assert (second.arch, second.registers, second.static_shared, second.spill_loads) == ("sm_80", 12, 0, 4)
    assert first.name in ("k<float>", "_Z1kIfEvPT_")  # demangled where c++filt exists
