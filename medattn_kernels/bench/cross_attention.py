"""Cases for the cross attention ops: DIN's stage-1 DIFM (B=2, H=1, 56x56 = 3136 tokens, D=96) and the
112x112 map (12544 tokens), both directions; the tied op on the same shapes; Joint Attention's gated
self-attention. Built-in: two F.scaled_dot_product_attention calls (one per direction), PyTorch's
flash-style kernel on CPU and its memory-efficient / flash kernels on the GPU.

GFLOP/s count the nominal work of two attentions for every candidate (per direction 4 B H Nq Nk D forward,
2.5x that backward), so the tied op's rate is an effective rate (it does 3 instead of 4 block products
forward and 7 instead of 10 backward)."""
import torch
import torch.nn.functional as F

from .. import bidirectional_cross_attention, cross_attention, reference, tied_cross_attention
from ..testing import make_tensor
from .harness import Candidate, Case

REFERENCE_MAX_TOKENS = 4096  # the naive reference keeps N x N matrices: 12544 tokens would keep ~2.5 GB


def _sdpa(q, k, v, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _attention_flops(b, h, nq, nk, d, directions=2):
    fwd = directions * 4.0 * b * h * nq * nk * d
    return fwd, 3.5 * fwd


def cases(device: str, dtype: torch.dtype, quick: bool):
    tokens = [3136] if quick else [3136, 12544]
    fused = ["triton"] if device.startswith("cuda") else ["cpu"]
    b, h, d = 2, 1, 96
    out = []

    def tok(n):
        return make_tensor((b, h, n, d), dtype, device, requires_grad=True)

    for n in tokens:
        fwd_flops, flops = _attention_flops(b, h, n, n, d)
        with_reference = n <= REFERENCE_MAX_TOKENS

        def make_bi(n=n):
            return {name: tok(n) for name in ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")}

        bi_cands = [Candidate("reference", lambda **kw: bidirectional_cross_attention(**kw, backend="reference"),
                              "reference")] if with_reference else []
        bi_cands += [Candidate(f"medattn {f}", lambda f=f, **kw: bidirectional_cross_attention(**kw, backend=f))
                     for f in fused]
        bi_cands.append(Candidate("2x F.sdpa", lambda q_a, k_a, v_a, q_b, k_b, v_b: (
            _sdpa(q_a, k_b, v_b), _sdpa(q_b, k_a, v_a)), "builtin"))
        out.append(Case(op="bidirectional_cross_attention", shape=f"B{b} H{h} N{n} D{d}", make_inputs=make_bi,
                        candidates=bi_cands, reference64=reference.bidirectional_cross_attention if with_reference
                        else None, flops=flops, forward_flops=fwd_flops))

        def make_tied(n=n):
            return {name: tok(n) for name in ("r_a", "v_a", "r_b", "v_b")}

        tied_cands = [Candidate("reference", lambda **kw: tied_cross_attention(**kw, backend="reference"),
                                "reference")] if with_reference else []
        tied_cands += [Candidate(f"medattn {f}", lambda f=f, **kw: tied_cross_attention(**kw, backend=f))
                       for f in fused]
        tied_cands.append(Candidate("2x F.sdpa", lambda r_a, v_a, r_b, v_b: (
            _sdpa(r_a, r_b, v_b), _sdpa(r_b, r_a, v_a)), "builtin"))
        out.append(Case(op="tied_cross_attention", shape=f"B{b} H{h} N{n} D{d}", make_inputs=make_tied,
                        candidates=tied_cands, reference64=reference.tied_cross_attention if with_reference
                        else None, flops=flops, forward_flops=fwd_flops))

    # Joint Attention: gated self-attention over a 28x28 deep map, 4 heads of 64
    n, heads, hd = 784, 4, 64
    fwd_flops, flops = _attention_flops(b, heads, n, n, hd, directions=1)

    def make_gated():
        x = make_tensor((b, heads, n, hd), dtype, device, requires_grad=True)
        return {"q": x, "k": make_tensor((b, heads, n, hd), dtype, device, requires_grad=True),
                "v": make_tensor((b, heads, n, hd), dtype, device, requires_grad=True),
                "gate": make_tensor((b, heads, n), dtype, device, requires_grad=True)}

    gated = [Candidate("reference", lambda q, k, v, gate: cross_attention(q, k, v, gate=gate, backend="reference"),
                       "reference")]
    gated += [Candidate(f"medattn {f}", lambda q, k, v, gate, f=f: cross_attention(q, k, v, gate=gate, backend=f))
              for f in fused]
    gated.append(Candidate("F.sdpa * sigmoid", lambda q, k, v, gate: _sdpa(q, k, v) * torch.sigmoid(gate)[..., None],
                           "builtin"))
    out.append(Case(op="cross_attention", shape=f"B{b} H{heads} N{n} D{hd} gated", make_inputs=make_gated,
                    candidates=gated, reference64=lambda q, k, v, gate: reference.cross_attention(q, k, v, None, gate),
                    flops=flops, forward_flops=fwd_flops))
    return out
