"""cross_attention (optionally gated), bidirectional_cross_attention, tied_cross_attention: parity with the
float64 reference (outputs and every gradient), odd shapes, Dv != D, non-contiguous inputs, gradcheck,
opcheck on the six ops, torch.compile, Triton under the interpreter, extreme logits, N = 1, empty batch,
memory kept for backward, determinism, the nn modules and bad input."""
import pytest
import torch

import medattn_kernels as mk
from medattn_kernels import reference
from medattn_kernels.testing import (TF32_TOLERANCE, TOLERANCES, as_float64_leaves, assert_close_to_reference, grads_of, make_tensor,
                                     saved_tensor_bytes)

from conftest import triton_device

CPU_DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (Nq, Nk, D, Dv): odd token counts, the head dims of the issue, Dv != D, a single query / key
CA_SHAPES = [(37, 53, 24, 24), (29, 41, 20, 12), (37, 53, 48, 40), (53, 37, 96, 96), (1, 300, 96, 64), (300, 1, 24, 8)]
PAIR_SHAPES = [(37, 53, 24, 24, 40), (53, 37, 48, 48, 48), (1, 300, 96, 64, 96), (300, 1, 24, 8, 16)]


def degenerate_softmax(shape, dtype, tied=False) -> bool:
    """A softmax over a single key (or, for the tied op's column softmax, a single query) is identically
    1, so its backward term dS = P (dP - delta) is exactly 0 in exact arithmetic. The flash-style backward
    forms delta = rowsum(dO * out) from the saved, rounded output while dP comes from a GEMM, so that term
    is rounding noise (~2^-24 |dP| in float32 per score, ~2^-8 in bfloat16) where the reference has an
    exact 0 (or, for the tied op in float32, a small row term), and a per-gradient relative metric has
    no scale to absorb it. For these shapes each gradient's error is measured against the largest
    gradient of the same backward instead (see check_grads)."""
    return 1 in shape[:2] and (dtype == torch.bfloat16 or (tied and dtype == torch.float32))


def tokens(b, h, n, d, dtype=torch.float32, layout="contiguous", device="cpu", low=-2.0, high=2.0):
    return make_tensor((b, h, n, d), dtype, device, layout, requires_grad=True, low=low, high=high)


def check_grads(outs, refs, inputs, inputs64, dtype, names, tol=None, tf32=False, common_scale=False):
    outs = [outs] if isinstance(outs, torch.Tensor) else list(outs)
    refs = [refs] if isinstance(refs, torch.Tensor) else list(refs)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert o.shape == r.shape and o.dtype == dtype
        assert_close_to_reference(o, r, dtype, f"out {i}", tol=tol, tf32=tf32)
    grads = [torch.randn(r.shape, dtype=torch.float64, device=r.device) for r in refs]
    got, expected = grads_of(outs, inputs, grads), grads_of(refs, inputs64, grads)
    if common_scale:  # degenerate softmax shapes: one scale for every gradient of this backward
        scale = max(r.abs().max().item() for r in expected if r is not None)
        limit = tol if tol is not None else TOLERANCES[dtype]
        for name, g, g_ref in zip(names, got, expected):
            err = (g.double() - g_ref).abs().max().item() / scale
            assert err <= limit, f"grad {name}: error {err:.3e} of the largest gradient exceeds {limit:.1e}"
        return
    for name, g, g_ref in zip(names, got, expected):
        assert_close_to_reference(g, g_ref, dtype, f"grad {name}", tol=tol, tf32=tf32)


def ca_parity(backend, shape, dtype, gated, layout="contiguous", device="cpu", b=2, h=3, scale=None, tol=None,
              tf32=False, common_scale=False):
    nq, nk, d, dv = shape
    q, k, v = tokens(b, h, nq, d, dtype, layout, device), tokens(b, h, nk, d, dtype, layout, device), \
        tokens(b, h, nk, dv, dtype, layout, device)
    gate = make_tensor((b, h, nq), dtype, device, requires_grad=True, low=-3, high=3) if gated else None
    out = mk.cross_attention(q, k, v, scale, gate, backend=backend)
    q64, k64, v64, g64 = as_float64_leaves([q, k, v, gate])
    ref = reference.cross_attention(q64, k64, v64, scale, g64)
    inputs, inputs64 = [q, k, v, gate], [q64, k64, v64, g64]
    if not gated:
        inputs, inputs64 = inputs[:3], inputs64[:3]
    check_grads(out, ref, inputs, inputs64, dtype, ["q", "k", "v", "gate"], tol=tol, tf32=tf32,
                common_scale=common_scale)


def bi_inputs(shape, dtype=torch.float32, layout="contiguous", device="cpu", b=2, h=3):
    na, nb, d, dva, dvb = shape
    return [tokens(b, h, na, d, dtype, layout, device), tokens(b, h, na, d, dtype, layout, device),
            tokens(b, h, na, dva, dtype, layout, device), tokens(b, h, nb, d, dtype, layout, device),
            tokens(b, h, nb, d, dtype, layout, device), tokens(b, h, nb, dvb, dtype, layout, device)]


def tied_inputs(shape, dtype=torch.float32, layout="contiguous", device="cpu", b=2, h=3):
    na, nb, d, dva, dvb = shape
    return [tokens(b, h, na, d, dtype, layout, device), tokens(b, h, na, dva, dtype, layout, device),
            tokens(b, h, nb, d, dtype, layout, device), tokens(b, h, nb, dvb, dtype, layout, device)]


def bi_parity(backend, shape, dtype, layout="contiguous", device="cpu", scale=None, tol=None, tf32=False,
              common_scale=False, **kw):
    inputs = bi_inputs(shape, dtype, layout, device, **kw)
    outs = mk.bidirectional_cross_attention(*inputs, scale, backend=backend)
    inputs64 = as_float64_leaves(inputs)
    refs = reference.bidirectional_cross_attention(*inputs64, scale)
    check_grads(outs, refs, inputs, inputs64, dtype, ["q_a", "k_a", "v_a", "q_b", "k_b", "v_b"], tol=tol, tf32=tf32,
                common_scale=common_scale)


def tied_parity(backend, shape, dtype, layout="contiguous", device="cpu", scale=None, tol=None, tf32=False,
                common_scale=False, **kw):
    inputs = tied_inputs(shape, dtype, layout, device, **kw)
    outs = mk.tied_cross_attention(*inputs, scale, backend=backend)
    inputs64 = as_float64_leaves(inputs)
    refs = reference.tied_cross_attention(*inputs64, scale)
    check_grads(outs, refs, inputs, inputs64, dtype, ["r_a", "v_a", "r_b", "v_b"], tol=tol, tf32=tf32,
                common_scale=common_scale)


# ------------------------------------------------------------------------------------------ CPU parity
@pytest.mark.parametrize("shape", CA_SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("gated", [False, True])
def test_cpu_cross_attention(shape, dtype, gated):
    ca_parity("cpu", shape, dtype, gated, common_scale=degenerate_softmax(shape, dtype))


@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cpu_bidirectional(shape, dtype):
    bi_parity("cpu", shape, dtype, common_scale=degenerate_softmax(shape, dtype))


@pytest.mark.parametrize("shape", PAIR_SHAPES)
@pytest.mark.parametrize("dtype", CPU_DTYPES)
def test_cpu_tied(shape, dtype):
    tied_parity("cpu", shape, dtype, common_scale=degenerate_softmax(shape, dtype, tied=True))


# The CPU backward accumulates dQ, and with one stripe of query blocks per (batch, head) also dK and dV,
# straight into the gradients when they are dense [B, H, N, D] with D a whole number of vectors (64, 48 on
# both vector passes): one (batch, head) on 2 threads runs 2 stripes (dK, dV in buffers, dQ in place),
# 2 x 3 run 1 (all in place); D = 40 keeps every buffer. Bidirectional runs two problems in one backward.
@pytest.mark.parametrize("bh", [(1, 1), (2, 3)])
@pytest.mark.parametrize("shape", [(300, 272, 64, 48), (300, 272, 40, 40)])
def test_cpu_backward_in_place_and_in_stripes(bh, shape):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        ca_parity("cpu", shape, torch.float32, True, b=bh[0], h=bh[1])
        bi_parity("cpu", shape[:3] + (shape[3], shape[3]), torch.float32, b=bh[0], h=bh[1])
    finally:
        torch.set_num_threads(threads)


def test_cpu_noncontiguous_and_explicit_scale():
    ca_parity("cpu", (37, 53, 48, 40), torch.float32, True, layout="noncontiguous", scale=0.3)
    bi_parity("cpu", (37, 53, 24, 24, 40), torch.float32, layout="noncontiguous", scale=0.3)
    tied_parity("cpu", (37, 53, 24, 24, 40), torch.float32, layout="noncontiguous", scale=0.3)


def test_cpu_many_blocks_one_head():
    """One (batch, head) pair and several query / key blocks: the backward splits the queries into
    stripes whose dK / dV partial sums are added afterwards (with more than one thread), the tied
    forward merges per-stripe column softmax states."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        ca_parity("cpu", (700, 530, 24, 16), torch.float64, True, b=1, h=1)
        bi_parity("cpu", (700, 530, 24, 16, 8), torch.float64, b=1, h=1)
        tied_parity("cpu", (700, 530, 24, 16, 8), torch.float64, b=1, h=1)
    finally:
        torch.set_num_threads(threads)


def token_view(b, h, n, d, dtype=torch.float32):
    """[B, H, N, D] view of a [B, H, D, N] buffer, as `nn.attention.to_tokens` makes of a conv's map: tokens
    stride 1, channels stride N (the kernels pack it channel-major without a transpose)."""
    return make_tensor((b, h, d, n), dtype).transpose(-1, -2).requires_grad_()


@pytest.mark.parametrize("d", [16, 48])
def test_cpu_float32_many_blocks_token_views(d):
    """float32 (the vector kernels' fast path, unlike the float64 test above) over several query / key
    blocks and their tails (700 x 530 against 64-row, 128 / 256-key blocks), one head (stripes with 2
    threads), small head dims, Dv != D, on the token views of a U-Net's maps."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        na, nb, dv = 700, 530, d // 2 + 4
        q, k, v, g = token_view(1, 1, na, d), token_view(1, 1, nb, d), token_view(1, 1, nb, dv), \
            make_tensor((1, 1, na), requires_grad=True, low=-3, high=3)
        q64, k64, v64, g64 = as_float64_leaves([q, k, v, g])
        out = mk.cross_attention(q, k, v, None, g, backend="cpu")
        check_grads(out, reference.cross_attention(q64, k64, v64, None, g64), [q, k, v, g], [q64, k64, v64, g64],
                    torch.float32, ["q", "k", "v", "gate"])
        bi = [token_view(1, 1, n, c) for n, c in ((na, d), (na, d), (na, dv), (nb, d), (nb, d), (nb, d))]
        bi64 = as_float64_leaves(bi)
        outs = mk.bidirectional_cross_attention(*bi, backend="cpu")
        check_grads(outs, reference.bidirectional_cross_attention(*bi64), bi, bi64, torch.float32,
                    ["q_a", "k_a", "v_a", "q_b", "k_b", "v_b"])
        tied = [token_view(1, 1, n, c) for n, c in ((na, d), (na, dv), (nb, d), (nb, d))]
        tied64 = as_float64_leaves(tied)
        outs, refs = mk.tied_cross_attention(*tied, backend="cpu"), reference.tied_cross_attention(*tied64)
        check_grads(outs, refs, tied, tied64, torch.float32, ["r_a", "v_a", "r_b", "v_b"])
    finally:
        torch.set_num_threads(threads)


def test_tied_matches_materialised_row_and_column_softmax():
    r_a, v_a, r_b, v_b = (t.detach() for t in tied_inputs((45, 61, 24, 16, 32), torch.float64, b=1, h=2))
    # Oracles first (csrc/tests/test_cross_attention.cpp says why: a float64 at::logsumexp right after the
    # kernels' first MKL GEMMs in a process was seen off by ~1e-10 relative).
    scores = 0.7 * r_a @ r_b.transpose(-1, -2)
    p_row, p_col = torch.softmax(scores, -1), torch.softmax(scores, -2)
    expected = (p_row @ v_b, p_col.transpose(-1, -2) @ v_a, torch.logsumexp(scores, -1), torch.logsumexp(scores, -2))
    outputs = torch.ops.medattn.tied_cross_attention(r_a, v_a, r_b, v_b, 0.7)
    for name, out, ref in zip(["o_a", "o_b", "lse_row", "lse_col"], outputs, expected):
        assert_close_to_reference(out, ref, torch.float64, name)


def test_extreme_logits():
    """|S| ~ 1e4: the online softmax must not overflow. float64 must match the reference to its usual
    tolerance. In float32 the scores themselves carry ~|S| 2^-24 absolute error (1 ulp of 1e4 is 1e-3),
    which exp turns into relative error of the probabilities in any float32 implementation (the float32
    reference included), so there the bound is that conditioning: 4 * 2^-24 * max |S|."""
    # 53 keys: maxima in a pass over the rows; 272: taken by the score product (see test_nan_propagates)
    for nk in (53, 272):
        ca_parity("cpu", (37, nk, 24, 24), torch.float64, True, scale=100.0)  # |S| up to 100 * 24 * 4 ~ 1e4
        tied_parity("cpu", (37, nk, 24, 24, 8), torch.float64, scale=100.0)
        bi_parity("cpu", (37, nk, 24, 24, 8), torch.float64, scale=100.0)
        # every score far below zero: a row max that counted anything but the scores (a zero) would underflow
        # every exp
        q, k = tokens(1, 2, 37, 24, torch.float64, low=1.0, high=2.0), tokens(1, 2, nk, 24, torch.float64, low=-2.0,
                                                                                high=-1.0)
        v = tokens(1, 2, nk, 8, torch.float64)
        assert_close_to_reference(mk.cross_attention(q, k, v, 100.0, backend="cpu"),
                                  reference.cross_attention(q, k, v, 100.0), torch.float64, "negative scores")
    inputs = tied_inputs((37, 53, 24, 24, 8), torch.float32)
    inputs64 = as_float64_leaves(inputs)
    outs = mk.tied_cross_attention(*inputs, 100.0, backend="cpu")
    refs = reference.tied_cross_attention(*inputs64, 100.0)
    max_score = (100.0 * inputs64[0] @ inputs64[2].transpose(-1, -2)).abs().max().item()
    assert max_score > 2e3
    check_grads(outs, refs, inputs, inputs64, torch.float32, ["r_a", "v_a", "r_b", "v_b"],
                tol=4 * 2.0 ** -24 * max_score)
    q = tokens(1, 2, 33, 24)
    out = mk.cross_attention(q, q, q, 1e4, backend="cpu")
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_n_equals_one_and_empty_batch():
    ca_parity("cpu", (1, 1, 24, 24), torch.float32, True)
    tied_parity("cpu", (1, 1, 24, 8, 8), torch.float32)
    bi_parity("cpu", (1, 1, 24, 8, 8), torch.float32)
    q = tokens(0, 2, 5, 8)
    out = mk.cross_attention(q, q, q, backend="cpu")
    out.sum().backward()
    assert out.shape == (0, 2, 5, 8) and q.grad.shape == q.shape
    o_a, o_b = mk.tied_cross_attention(q, q, q, q, backend="cpu")
    assert o_a.shape == (0, 2, 5, 8) and o_b.shape == (0, 2, 5, 8)
    o_a, o_b = mk.bidirectional_cross_attention(q, q, q, q, q, q, backend="cpu")
    assert o_a.shape == (0, 2, 5, 8)
    # no keys: softmax over an empty set, an empty sum: zero outputs and gradients (the kernels' output
    # accumulators are otherwise first written by the first key block)
    q, k, v = tokens(2, 3, 37, 16), tokens(2, 3, 0, 16), tokens(2, 3, 0, 8)
    out = mk.cross_attention(q, k, v, backend="cpu")
    out.backward(torch.randn_like(out))
    assert out.shape == (2, 3, 37, 8) and not out.any() and not q.grad.any()


def test_no_queries():
    # Nq = 0 with keys: empty outputs, zero key / value gradients; the other direction of a two-way op
    # attends over no keys (zeros, as above). Once a division by a block count of 0 (SIGFPE).
    q, k, v = tokens(2, 3, 0, 16), tokens(2, 3, 5, 16), tokens(2, 3, 5, 8)
    gate = make_tensor((2, 3, 0), requires_grad=True)
    out = mk.cross_attention(q, k, v, gate=gate, backend="cpu")
    out.sum().backward()
    assert out.shape == (2, 3, 0, 8) and not k.grad.any() and not v.grad.any() and gate.grad.shape == (2, 3, 0)
    for op in (mk.bidirectional_cross_attention, mk.tied_cross_attention):
        a = [tokens(2, 3, 0, 16) for _ in range(3 if op is mk.bidirectional_cross_attention else 2)]
        b = [tokens(2, 3, 5, 16) for _ in a]
        o_a, o_b = op(*a, *b, backend="cpu")
        (o_a.sum() + o_b.sum()).backward()
        assert o_a.shape == (2, 3, 0, 16) and o_b.shape == (2, 3, 5, 16) and not o_b.any()
        assert all(not t.grad.any() for t in b), op.__name__


# 7 keys: a key block with padding columns (row maxima in a pass over the scores); 272 = 256 + 16: whole-vector
# blocks, whose row maxima the score product takes as it stores them (medattn/tile_gemm.h, RowMax).
@pytest.mark.parametrize("nk", [7, 272])
def test_nan_propagates(nk):
    q, k, v = tokens(1, 1, 6, 8), tokens(1, 1, nk, 8), tokens(1, 1, nk, 8)
    with torch.no_grad():
        q[0, 0, 2, 3] = float("nan")
    out = mk.cross_attention(q, k, v, backend="cpu")
    ref = reference.cross_attention(q, k, v)
    assert torch.equal(torch.isnan(out), torch.isnan(ref)) and torch.isnan(out[0, 0, 2]).all()
    finite = torch.arange(6) != 2  # the other rows' maxima must ignore nothing and match
    assert_close_to_reference(out[:, :, finite], reference.cross_attention(*as_float64_leaves([q, k, v]))[:, :, finite],
                              torch.float32, "finite rows")


def test_gradcheck_float64():
    q, k, v = tokens(1, 2, 5, 4, torch.float64), tokens(1, 2, 7, 4, torch.float64), tokens(1, 2, 7, 3, torch.float64)
    gate = make_tensor((1, 2, 5), torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: mk.cross_attention(*a[:3], 0.8, a[3], backend="cpu"),
                                    (q, k, v, gate))
    bi = bi_inputs((5, 7, 4, 3, 2), torch.float64, b=1, h=2)
    assert torch.autograd.gradcheck(lambda *a: mk.bidirectional_cross_attention(*a, backend="cpu"), tuple(bi))
    tied = tied_inputs((5, 7, 4, 3, 2), torch.float64, b=1, h=2)
    assert torch.autograd.gradcheck(lambda *a: mk.tied_cross_attention(*a, backend="cpu"), tuple(tied))


def test_partial_requires_grad_and_unused_output():
    q, k, v = tokens(1, 2, 9, 8), tokens(1, 2, 11, 8), tokens(1, 2, 11, 8)
    k.requires_grad_(False)
    out = mk.cross_attention(q, k, v, backend="cpu")
    out.sum().backward()
    assert k.grad is None and q.grad is not None and v.grad is not None
    inputs = tied_inputs((9, 11, 8, 4, 4), b=1, h=2)
    o_a, _ = mk.tied_cross_attention(*inputs, backend="cpu")  # o_b does not reach the loss
    o_a.sum().backward()
    inputs64 = as_float64_leaves(inputs)
    reference.tied_cross_attention(*inputs64)[0].sum().backward()
    for t, t64 in zip(inputs, inputs64):
        if t64.grad is None:  # v_a only reaches o_b
            assert t.grad is None or not t.grad.any()
        else:
            assert_close_to_reference(t.grad, t64.grad, torch.float32)


def test_memory_kept_for_backward():
    """Inputs, outputs and one float per softmax row / column: far below the reference's N x N."""
    n, d = 512, 32
    for fn, inputs, out_numel in [
        (lambda *a: mk.cross_attention(*a, backend="cpu"), [tokens(1, 2, n, d) for _ in range(3)], 2 * n * (d + 1)),
        (lambda *a: mk.bidirectional_cross_attention(*a, backend="cpu"), bi_inputs((n, n, d, d, d), b=1, h=2),
         2 * 2 * n * (d + 1)),
        (lambda *a: mk.tied_cross_attention(*a, backend="cpu"), tied_inputs((n, n, d, d, d), b=1, h=2),
         2 * 2 * n * (d + 1)),
    ]:
        kept = saved_tensor_bytes(fn, *inputs)
        assert 0 < kept <= 4 * out_numel  # the outputs and the log-sum-exp rows (float32)
    ref_kept = saved_tensor_bytes(lambda *a: reference.tied_cross_attention(*a), *tied_inputs((n, n, d, d, d), b=1, h=2))
    assert ref_kept >= 2 * 2 * n * n * 4  # two [1, 2, N, N] float32 probability matrices


def test_deterministic():
    inputs = tied_inputs((300, 301, 24, 16, 16), b=1, h=1)
    grads = [torch.randn(1, 1, 300, 16), torch.randn(1, 1, 301, 16)]
    first = torch.autograd.grad(mk.tied_cross_attention(*inputs, backend="cpu"), inputs, grads)
    second = torch.autograd.grad(mk.tied_cross_attention(*inputs, backend="cpu"), inputs, grads)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    bi = bi_inputs((300, 301, 24, 16, 16), b=1, h=1)
    gb = [torch.randn(1, 1, 300, 16), torch.randn(1, 1, 301, 16)]
    first = torch.autograd.grad(mk.bidirectional_cross_attention(*bi, backend="cpu"), bi, gb)
    second = torch.autograd.grad(mk.bidirectional_cross_attention(*bi, backend="cpu"), bi, gb)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ------------------------------------------------------------------------------------------ op machinery
def test_opcheck_all_six_ops():
    q, k, v = tokens(1, 2, 9, 8), tokens(1, 2, 11, 8), tokens(1, 2, 11, 6)
    gate = make_tensor((1, 2, 9), requires_grad=True)
    for args in [(q, k, v, None, None), (q, k, v, 0.5, gate)]:
        torch.library.opcheck(torch.ops.medattn.cross_attention.default, args)
    out, lse = (t.detach() for t in torch.ops.medattn.cross_attention(q, k, v, 0.5, gate))
    torch.library.opcheck(torch.ops.medattn.cross_attention_backward.default,
                          (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out, lse, 0.5, gate.detach()))
    bi = bi_inputs((9, 11, 8, 6, 4), b=1, h=2)
    torch.library.opcheck(torch.ops.medattn.bidirectional_cross_attention.default, (*bi, None))
    o_a, o_b, lse_a, lse_b = (t.detach() for t in torch.ops.medattn.bidirectional_cross_attention(*bi, None))
    torch.library.opcheck(torch.ops.medattn.bidirectional_cross_attention_backward.default,
                          (torch.randn_like(o_a), torch.randn_like(o_b), *(t.detach() for t in bi), o_a, o_b, lse_a,
                           lse_b, None))
    tied = tied_inputs((9, 11, 8, 6, 4), b=1, h=2)
    torch.library.opcheck(torch.ops.medattn.tied_cross_attention.default, (*tied, 0.9))
    o_a, o_b, lse_row, lse_col = (t.detach() for t in torch.ops.medattn.tied_cross_attention(*tied, 0.9))
    torch.library.opcheck(torch.ops.medattn.tied_cross_attention_backward.default,
                          (torch.randn_like(o_a), torch.randn_like(o_b), *(t.detach() for t in tied), o_a, o_b,
                           lse_row, lse_col, 0.9))


def test_torch_compile_fullgraph():
    q, k, v = tokens(2, 2, 13, 8), tokens(2, 2, 17, 8), tokens(2, 2, 17, 8)
    gate = make_tensor((2, 2, 13), requires_grad=True)
    bi = bi_inputs((13, 17, 8, 8, 8), b=1, h=2)

    def f(q, k, v, gate, *bi):
        o_a, o_b = mk.bidirectional_cross_attention(*bi)
        return mk.cross_attention(q, k, v, gate=gate).sum() + o_a.sum() * 2 + o_b.sum()

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    out = compiled(q, k, v, gate, *bi)
    out.backward()
    leaves64 = as_float64_leaves([q, k, v, gate, *bi])
    o_a, o_b = reference.bidirectional_cross_attention(*leaves64[4:])
    ref = reference.cross_attention(*leaves64[:3], None, leaves64[3]).sum() + o_a.sum() * 2 + o_b.sum()
    assert_close_to_reference(out, ref, torch.float32)
    assert all(t.grad is not None for t in [q, k, v, gate, *bi])


def test_default_backend_and_float16_fallback():
    ca_parity(None, (37, 53, 24, 24), torch.float32, True)
    q = tokens(1, 1, 7, 8, torch.float16)
    out = mk.cross_attention(q, q, q)
    assert_close_to_reference(out, reference.cross_attention(*as_float64_leaves([q, q, q])), torch.float16)


def test_modules_fused_match_reference():
    x, y = make_tensor((2, 8, 5, 7), requires_grad=True), make_tensor((2, 8, 5, 7), requires_grad=True)
    torch.manual_seed(0)
    for cls, args in [(mk.nn.CrossImageAttention, (x, y)), (mk.nn.DualInteractiveFusion, (x, y)),
                      (mk.nn.JointAttention, (x,))]:
        fused = cls(8, heads=2)
        plain = cls(8, heads=2, fused=False)
        plain.load_state_dict(fused.state_dict())
        out = fused(*args)
        ref = plain.double()(*(a.double() for a in args))
        assert out.shape == x.shape
        assert_close_to_reference(out, ref, torch.float32, f"{cls.__name__}")
        out.sum().backward()
        assert x.grad is not None
        assert "fused=True" in repr(fused)


@pytest.mark.parametrize("call, error, match", [
    (lambda: mk.cross_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)), ValueError,
     r"q: expected a 4-D tensor \[B, H, N, D\]"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 4)),
     ValueError, r"k: expected head dim 4"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 6, 4)),
     ValueError, r"v: expected 5 tokens \(as k\)"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 3, 5, 4), torch.randn(1, 3, 5, 4)),
     ValueError, r"k: expected batch and heads \(1, 2\)"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4).double(), torch.randn(1, 2, 5, 4)),
     TypeError, r"k: expected dtype float32"),
    (lambda: mk.cross_attention(torch.randint(0, 3, (1, 2, 3, 4)), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)),
     TypeError, r"q: expected a floating"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
                                gate=torch.randn(1, 2, 4)), ValueError, r"gate: expected shape \[B, H, Nq\]"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
                                float("inf")), ValueError, r"scale: expected a finite float"),
    (lambda: mk.cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4),
                                torch.tensor(1.0)), TypeError, r"scale: expected a Python float"),
    (lambda: mk.bidirectional_cross_attention(*[torch.randn(1, 2, 3, 4)] * 3, torch.randn(1, 2, 5, 4),
                                              torch.randn(1, 2, 6, 4), torch.randn(1, 2, 5, 4)),
     ValueError, r"k_b: expected 5 tokens \(as q_b\)"),
    (lambda: mk.tied_cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 6),
                                     torch.randn(1, 2, 5, 4)), ValueError, r"r_b: expected head dim 4"),
    (lambda: mk.tied_cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4), torch.randn(1, 2, 5, 4),
                                     torch.randn(1, 2, 5, 4)), ValueError, r"v_a: expected 3 tokens \(as r_a\)"),
    (lambda: mk.cross_attention(*[torch.randn(1, 1, 3, 4).half()] * 3, backend="cpu"), TypeError,
     r"q: backend 'cpu' .* supports float32, float64, bfloat16, got float16"),
    (lambda: mk.cross_attention(*[torch.randn(1, 1, 3, 4)] * 3, backend="cuda"), RuntimeError,
     r"backend 'cuda' is not available"),
    (lambda: torch.ops.medattn.cross_attention(torch.randn(2, 3, 4), torch.randn(2, 3, 4), torch.randn(2, 3, 4)),
     RuntimeError, r"q: expected a 4-D tensor"),
    (lambda: torch.ops.medattn.tied_cross_attention(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 4, 4),
                                                    torch.randn(1, 2, 5, 4), torch.randn(1, 2, 5, 4)),
     RuntimeError, r"v_a: expected size 3 at dim 2"),
])
def test_bad_input(call, error, match):
    with pytest.raises(error, match=match):
        call()


# ------------------------------------------------------------------------------------------ Triton
TRITON_TF32 = torch.cuda.is_available() and triton_device() == "cuda"  # the interpreter computes in IEEE fp32


def tolerance_of():
    return TF32_TOLERANCE if TRITON_TF32 else TOLERANCES[torch.float32]


@pytest.mark.triton
@pytest.mark.parametrize("shape", [(37, 53, 24, 24), (19, 70, 48, 40)])
@pytest.mark.parametrize("gated", [False, True])
def test_triton_cross_attention(shape, gated):
    ca_parity("triton", shape, torch.float32, gated, device=triton_device(), b=1, h=2, tf32=TRITON_TF32)


@pytest.mark.triton
def test_triton_bidirectional_and_tied():
    bi_parity("triton", (37, 53, 24, 24, 40), torch.float32, device=triton_device(), b=1, h=2, tf32=TRITON_TF32)
    tied_parity("triton", (37, 53, 24, 40, 24), torch.float32, device=triton_device(), b=1, h=2, tf32=TRITON_TF32)


@pytest.mark.triton
def test_triton_noncontiguous_extreme_logits_and_n1():
    dev = triton_device()
    ca_parity("triton", (21, 33, 24, 24), torch.float32, True, layout="noncontiguous", device=dev, b=1, h=1,
              tf32=TRITON_TF32)
    tied_parity("triton", (1, 1, 24, 8, 8), torch.float32, device=dev, b=1, h=1, tf32=TRITON_TF32)
    # |S| ~ 1e4: finite everywhere; outputs within the float32 conditioning of the scores (see
    # test_extreme_logits; the gradients of a one-hot softmax are pure cancellation, checked finite)
    inputs = tied_inputs((21, 33, 24, 24, 8), torch.float32, device=dev, b=1, h=1)
    outs = mk.tied_cross_attention(*inputs, 300.0, backend="triton")
    inputs64 = as_float64_leaves(inputs)
    refs = reference.tied_cross_attention(*inputs64, 300.0)
    max_score = (300.0 * inputs64[0] @ inputs64[2].transpose(-1, -2)).abs().max().item()
    for out, ref in zip(outs, refs):
        assert_close_to_reference(out, ref, torch.float32, tol=4 * 2.0 ** -24 * max_score + tolerance_of())
    grads = torch.autograd.grad(outs, inputs, [torch.randn_like(o) for o in outs])
    assert all(torch.isfinite(g).all() for g in grads)


# The head dims whose fp32 launches asked sm_90 for more shared memory than a block may have, or spilled,
# before the launch plans of issue 12 (D 65-256; DIN's last stage has D = 96): every kernel on the
# plans' tiles for these widths (TF32 and IEEE fp32 plans, fp16 / bf16), small shapes, every gradient.
WIDE_HEADS = [(96, 96), (128, 64), (200, 256)]


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("d, dv", [(24, 24)] + WIDE_HEADS)
def test_triton_low_precision(dtype, d, dv):
    dev = triton_device()
    ca_parity("triton", (37, 53, d, dv), dtype, True, device=dev, b=1, h=1)
    tied_parity("triton", (29, 31, d, dv, dv), dtype, device=dev, b=1, h=1)


@pytest.mark.triton
@pytest.mark.parametrize("d, dv", WIDE_HEADS)
@pytest.mark.parametrize("tf32", [True, False], ids=["tf32-plan", "ieee-plan"])
def test_triton_wide_heads_fp32(d, dv, tf32, monkeypatch):
    from medattn_kernels.triton import cross_attention as kernels

    monkeypatch.setattr(kernels, "ALLOW_TF32", tf32)
    assert kernels.operand_class(torch.float32) == ("tf32" if tf32 else "ieee")
    dev, tf32_numerics = triton_device(), TRITON_TF32 and tf32
    ca_parity("triton", (37, 70, d, dv), torch.float32, d == 96, device=dev, b=1, h=1, tf32=tf32_numerics)
    bi_parity("triton", (37, 70, d, dv, d), torch.float32, device=dev, b=1, h=1, tf32=tf32_numerics)
    tied_parity("triton", (37, 70, d, dv, dv), torch.float32, device=dev, b=1, h=1, tf32=tf32_numerics)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_ops_match_reference(dtype):
    tf32 = dtype == torch.float32
    ca_parity(None, (1000, 777, 96, 96), dtype, True, device="cuda", tf32=tf32)
    bi_parity(None, (1000, 777, 64, 64, 64), dtype, device="cuda", tf32=tf32)
    tied_parity(None, (1000, 777, 128, 96, 96), dtype, device="cuda", tf32=tf32)


@pytest.mark.cuda
def test_cuda_opcheck():
    q = tokens(1, 2, 33, 64, device="cuda")
    torch.library.opcheck(torch.ops.medattn.cross_attention.default, (q, q, q, None, None))
