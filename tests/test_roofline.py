"""The GPU benchmark tables' performance model (medattn_kernels/bench/roofline.py): FLOP and byte formulas
against hand counts, the roofline time, the GPU lookup, the benchmark cases it covers, and the table's
"% roof" columns."""
import math

import pytest
import torch

from medattn_kernels.bench import harness, op_modules, roofline


def test_attention_counts_by_hand():
    # b=1, h=2, nq=3, nk=5, d=4, dv=6, fp16 (2 bytes)
    w = roofline.attention_work(1, 2, 3, 5, 4, 6, 2, "fp16")
    # forward: S = q k^T (2*3*5*4 = 120 per head) + P v (2*3*5*6 = 180), 2 heads
    assert w.fwd_flops == 2 * (120 + 180)
    # backward: S again (120), dV = P^T dO (180), dP = dO v^T (180), dQ = dS k (120), dK = dS^T q (120)
    assert w.fwd_bwd_flops == 2 * (120 + 180) + 2 * (120 + 180 + 180 + 120 + 120)
    # forward bytes: q 3*4, k 5*4, v 5*6, o 3*6 elements per head at 2 B, lse 3 floats per head
    per_head = 2 * (12 + 20 + 30 + 18) + 4 * 3
    assert w.fwd_bytes == 2 * per_head
    # backward: q, k, v, o, dO, lse read; dq, dk, dv written
    bwd_per_head = 2 * (12 + 20 + 30 + 18 + 18 + 12 + 20 + 30) + 4 * 3
    assert w.fwd_bwd_bytes == 2 * (per_head + bwd_per_head)


def test_attention_backward_is_two_and_a_half_forwards_for_equal_head_dims():
    w = roofline.attention_work(2, 1, 3136, 3136, 96, 96, 4, "tf32")
    assert w.fwd_bwd_flops == pytest.approx(3.5 * w.fwd_flops)
    assert w.fwd_flops == 4.0 * 2 * 3136 * 3136 * 96  # the benchmark's nominal count per direction


def test_tied_counts_by_hand():
    # b=h=1, na=2, nb=3, d=4, dva=5, dvb=6, fp32
    w = roofline.tied_work(1, 1, 2, 3, 4, 5, 6, 4, "tf32")
    assert w.fwd_flops == 2 * 2 * 3 * (4 + 5 + 6)  # S once, o_a = P v_b, o_b = P^T v_a
    assert w.fwd_bwd_flops - w.fwd_flops == 2 * 2 * 3 * (3 * 4 + 2 * 5 + 2 * 6)
    inputs = 2 * 4 + 2 * 5 + 3 * 4 + 3 * 6  # r_a, v_a, r_b, v_b
    outputs = 2 * 6 + 3 * 5  # o_a [na, dvb], o_b [nb, dva]
    assert w.fwd_bytes == 4 * (inputs + outputs) + 4 * (2 + 3)
    assert w.fwd_bwd_bytes == w.fwd_bytes + 4 * (2 * inputs + 2 * outputs) + 4 * (2 + 3)
    # fewer FLOPs than two independent attentions on the same shapes (the point of the tied op)
    two = [roofline.attention_work(1, 1, 2, 3, 4, 6, 4, "tf32"), roofline.attention_work(1, 1, 3, 2, 4, 5, 4, "tf32")]
    assert w.fwd_bwd_flops < sum(x.fwd_bwd_flops for x in two)


def test_depthwise_counts_by_hand():
    w = roofline.depthwise_work(2, 3, 10, 12, 5, 7, 10, 12, 4, True, "fp32")
    assert w.fwd_flops == 2 * 2 * 3 * 10 * 12 * 5 * 7
    assert w.fwd_bwd_flops == 3 * w.fwd_flops  # grad input and grad weight cost a forward each
    x, wgt = 2 * 3 * 10 * 12, 3 * 5 * 7 + 3
    assert w.fwd_bytes == 4 * (x + wgt + x)
    assert w.fwd_bwd_bytes == w.fwd_bytes + 4 * (x + x + wgt + x + wgt)


def test_memory_bound_ops_by_hand():
    g1, g2 = roofline.gsa_work(2 * 3 * 4 * 5, 1, 2, "fp32"), roofline.gsa_work(2 * 3 * 4 * 5, 2, 2, "fp32")
    n = 2 * 3 * 4 * 5
    assert (g1.fwd_bytes, g1.fwd_bwd_bytes) == (2 * 2 * n, 2 * 2 * n + 2 * 3 * n)  # x, out; g, x, gx
    assert (g2.fwd_bytes, g2.fwd_bwd_bytes) == (2 * 3 * n, 2 * 3 * n + 2 * 5 * n)  # x, y, out; g, x, y, gx, gy
    assert g2.fwd_flops == 5 * n
    abn = roofline.activated_bn_work(2 * 3 * 4 * 5, 4, "fp32")
    assert (abn.fwd_bytes, abn.fwd_bwd_bytes) == (4 * 2 * n, 4 * 5 * n)  # x, y; then y, dy, dx
    sob = roofline.sobel_work(1, 2, 8, 8, (1, 2, 4), 4, 1000, "fp32")
    pooled = 2 * (64 + 16 + 4)
    assert sob.fwd_flops == 2 * 128 * 3 + roofline.SOBEL_FORWARD_FLOPS_PER_PIXEL * pooled
    assert (sob.fwd_bytes, sob.fwd_bwd_bytes) == (4 * 128 + 1000, 4 * 128 + 1000 + 4 * 128)


def test_roofline_time_is_the_slower_bound():
    h100, h200 = roofline.H100_SXM, roofline.H200
    # 989e12 FLOPs at fp16 take 1 s; 3.35e12 bytes take 1 s on an H100, 0.698 s on an H200
    assert roofline.roofline_seconds(989e12, 1.0, "fp16", h100) == pytest.approx(1.0)
    assert roofline.roofline_seconds(1.0, 3.35e12, "fp16", h100) == pytest.approx(1.0)
    assert roofline.roofline_seconds(1.0, 3.35e12, "fp16", h200) == pytest.approx(3.35 / 4.8)
    assert roofline.roofline_seconds(67e12, 0.0, "fp32", h200) == pytest.approx(1.0)
    assert roofline.roofline_seconds(495e12, 0.0, "tf32", h100) == pytest.approx(1.0)


def test_gpu_lookup():
    assert roofline.gpu_of("NVIDIA H100 80GB HBM3") is roofline.H100_SXM
    assert roofline.gpu_of("NVIDIA H200") is roofline.H200
    assert roofline.gpu_of("NVIDIA H100 PCIe") is None  # other clocks and memory: not modelled
    assert roofline.gpu_of("NVIDIA A100-SXM4-80GB") is None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_every_benchmark_case_is_modelled(dtype):
    covered = 0
    for module in op_modules().values():
        for case in module.cases("meta", dtype, False):
            work = roofline.case_work(case.op, case.make_inputs())
            if "conv3x3" in case.shape:  # a composite (conv + op): not the op's roofline
                assert work is None
                continue
            assert work is not None and work.fwd_flops > 0 and work.fwd_bwd_bytes > work.fwd_bytes, case.shape
            covered += 1
    assert covered >= 15


def test_bidirectional_case_sums_both_directions():
    inputs = {n: torch.empty((2, 1, 3136, 96), device="meta") for n in ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")}
    work = roofline.case_work("bidirectional_cross_attention", inputs, tf32=True)
    one = roofline.attention_work(2, 1, 3136, 3136, 96, 96, 4, "tf32")
    assert (work.fwd_flops, work.fwd_bwd_bytes, work.math) == (2 * one.fwd_flops, 2 * one.fwd_bwd_bytes, "tf32")
    assert roofline.case_work("bidirectional_cross_attention", inputs, tf32=False).math == "fp32"


def test_table_shows_the_roofline_fraction_on_modelled_gpus():
    inputs = {"x": torch.empty((8, 96, 56, 56), device="meta")}
    result = harness.Result("global_spatial_attention", "s", "medattn triton", "fused", "cuda", "float32",
                            fwd_ms=1.0, fwd_bwd_ms=2.0, saved_mib=0.0, max_rel_err=0.0)
    roofline.annotate([result], "global_spatial_attention", inputs, "NVIDIA H100 80GB HBM3")
    n = 8 * 96 * 56 * 56
    assert result.extra["roofline_fwd_ms"] == pytest.approx(1e3 * 4 * 2 * n / 3.35e12)
    assert roofline.fraction(result, "fwd") == pytest.approx(result.extra["roofline_fwd_ms"] / 1.0)
    table = harness.format_table([result])
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    assert header[3:7] == ["fwd ms", "fwd % roof", "fwd+bwd ms", "fwd+bwd % roof"]
    cells = [c.strip() for c in table.splitlines()[2].split("|")[1:-1]]
    assert cells[4] == format(100 * roofline.fraction(result, "fwd"), ".0f")
    other = harness.Result("global_spatial_attention", "s", "x", "fused", "cuda", "float32", 1.0, 2.0, 0.0, 0.0)
    roofline.annotate([other], "global_spatial_attention", inputs, "NVIDIA A100")  # not modelled: no column
    assert "% roof" not in harness.format_table([other]) and math.isnan(roofline.fraction(other, "fwd"))
