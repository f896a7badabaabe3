"""Cases for the cross attention ops, each against the best PyTorch path a user has:

* DIN's stage-1 DIFM size (B=2, H=1, 56x56 = 3136 tokens, D=96) and the 112x112 map (12544 tokens), both
  directions, bidirectional and tied, against two F.scaled_dot_product_attention calls on contiguous
  q/k/v (PyTorch's flash-style kernel on CPU, its flash / memory-efficient kernels on the GPU);
* the small head dims the networks use (16, 24, 32, 48, 64) at 3136 tokens;
* DIN's four DIFM attentions at 224 px, batch 8 (stage widths 16, 24, 32, 48 = head dims, one head,
  3136 / 784 / 196 / 49 tokens), on the strided token views the network produces from its 1x1-conv
  outputs: our kernels take the views as they are; SDPA on the views falls back on CPU to its O(N^2) math
  path, so it also runs on contiguous copies (what a user who knows would write);
* Joint Attention's gated self-attention (B2 H4 N784 D64) against SDPA * sigmoid(gate).

GFLOP/s count the nominal work of the attentions for every candidate (per direction 4 B H Nq Nk D forward,
2.5x that backward), so the tied op's rate is an effective rate (it does 3 instead of 4 block products
forward and 7 instead of 10 backward)."""
import torch

from .. import bidirectional_cross_attention, cross_attention, reference, tied_cross_attention
from ..nn.attention import to_tokens
from ..testing import make_tensor
from .harness import Candidate, Case

REFERENCE_MAX_TOKENS = 4096  # the naive reference keeps N x N matrices: 12544 tokens would keep ~2.5 GB
DIN_STAGES = ((56, 16), (28, 24), (14, 32), (7, 48))  # DIN at 224 px: (side, width = head dim), heads 1
SMALL_HEAD_DIMS = (16, 24, 32, 48, 64)


def _attention_flops(b, h, nq, nk, d, directions=2):
    fwd = directions * 4.0 * b * h * nq * nk * d
    return fwd, 3.5 * fwd


def _fused(device):
    return ["triton"] if device.startswith("cuda") else ["cpu"]


def _bidirectional_case(device, dtype, b, h, n, d, with_reference):
    fwd_flops, flops = _attention_flops(b, h, n, n, d)

    def make():
        return {name: make_tensor((b, h, n, d), dtype, device, requires_grad=True)
                for name in ("q_a", "k_a", "v_a", "q_b", "k_b", "v_b")}

    cands = [Candidate("reference", lambda **kw: bidirectional_cross_attention(**kw, backend="reference"),
                       "reference")] if with_reference else []
    cands += [Candidate(f"medattn {f}", lambda f=f, **kw: bidirectional_cross_attention(**kw, backend=f))
              for f in _fused(device)]
    cands.append(Candidate("2x F.sdpa", lambda **kw: reference.sdpa_bidirectional_cross_attention(**kw), "builtin"))
    return Case(op="bidirectional_cross_attention", shape=f"B{b} H{h} N{n} D{d}", make_inputs=make,
                candidates=cands, reference64=reference.bidirectional_cross_attention if with_reference else None,
                flops=flops, forward_flops=fwd_flops)


def _tied_case(device, dtype, b, h, n, d, with_reference):
    fwd_flops, flops = _attention_flops(b, h, n, n, d)

    def make():
        return {name: make_tensor((b, h, n, d), dtype, device, requires_grad=True)
                for name in ("r_a", "v_a", "r_b", "v_b")}

    cands = [Candidate("reference", lambda **kw: tied_cross_attention(**kw, backend="reference"),
                       "reference")] if with_reference else []
    cands += [Candidate(f"medattn {f}", lambda f=f, **kw: tied_cross_attention(**kw, backend=f))
              for f in _fused(device)]
    cands.append(Candidate("2x F.sdpa", lambda **kw: reference.sdpa_tied_cross_attention(**kw), "builtin"))
    return Case(op="tied_cross_attention", shape=f"B{b} H{h} N{n} D{d}", make_inputs=make, candidates=cands,
                reference64=reference.tied_cross_attention if with_reference else None,
                flops=flops, forward_flops=fwd_flops)


def _din_difm_case(device, dtype, batch, stages, label):
    """DIFM attentions as DIN runs them: q, k, v are strided views of each image's 1x1-conv output."""
    fwd_flops = sum(_attention_flops(batch, 1, s * s, s * s, c)[0] for s, c in stages)

    def make():
        inputs = {}
        for i, (side, c) in enumerate(stages):
            inputs[f"qkv_a{i}"] = make_tensor((batch, 3 * c, side, side), dtype, device, requires_grad=True)
            inputs[f"qkv_b{i}"] = make_tensor((batch, 3 * c, side, side), dtype, device, requires_grad=True)
        return inputs

    def run(attend):
        def fn(**kw):
            outs = []
            for i in range(len(stages)):
                q_a, k_a, v_a = (to_tokens(t, 1) for t in kw[f"qkv_a{i}"].chunk(3, dim=1))
                q_b, k_b, v_b = (to_tokens(t, 1) for t in kw[f"qkv_b{i}"].chunk(3, dim=1))
                outs += attend(q_a, k_a, v_a, q_b, k_b, v_b)
            return tuple(outs)
        return fn

    cands = [Candidate(f"medattn {f} (views)", run(lambda *t, f=f: bidirectional_cross_attention(*t, backend=f)))
             for f in _fused(device)]
    cands += [
        Candidate("2x F.sdpa (views)", run(lambda *t: reference.sdpa_bidirectional_cross_attention(
            *t, contiguous=False)), "builtin"),
        Candidate("2x F.sdpa (contiguous copies)", run(reference.sdpa_bidirectional_cross_attention), "builtin"),
    ]
    return Case(op="bidirectional_cross_attention", shape=label, make_inputs=make, candidates=cands,
                reference64=run(reference.bidirectional_cross_attention), flops=3.5 * fwd_flops,
                forward_flops=fwd_flops)


def cases(device: str, dtype: torch.dtype, quick: bool):
    b, h, d = 2, 1, 96
    out = []
    for n in ([3136] if quick else [3136, 12544]):
        with_reference = n <= REFERENCE_MAX_TOKENS
        if n <= REFERENCE_MAX_TOKENS or not quick:
            out.append(_bidirectional_case(device, dtype, b, h, n, d, with_reference))
        out.append(_tied_case(device, dtype, b, h, n, d, with_reference))
    for hd in ((16, 48) if quick else SMALL_HEAD_DIMS):
        out.append(_bidirectional_case(device, dtype, b, h, 784 if quick else 3136, hd, False))
    batch = 2 if quick else 8
    out.append(_din_difm_case(device, dtype, batch, DIN_STAGES,
                              f"DIN 224px DIFM x4 (B{batch}, N 3136..49, D 16..48, views)"))
    out.append(_din_difm_case(device, dtype, batch, DIN_STAGES[:1], f"DIN DIFM stage 1 (B{batch} N3136 D16, views)"))

    # Joint Attention: gated self-attention over a 28x28 deep map, 4 heads of 64
    n, heads, hd = 784, 4, 64
    fwd_flops, flops = _attention_flops(b, heads, n, n, hd, directions=1)

    def make_gated():
        return {"q": make_tensor((b, heads, n, hd), dtype, device, requires_grad=True),
                "k": make_tensor((b, heads, n, hd), dtype, device, requires_grad=True),
                "v": make_tensor((b, heads, n, hd), dtype, device, requires_grad=True),
                "gate": make_tensor((b, heads, n), dtype, device, requires_grad=True)}

    gated = [Candidate("reference", lambda q, k, v, gate: cross_attention(q, k, v, gate=gate, backend="reference"),
                       "reference")]
    gated += [Candidate(f"medattn {f}", lambda q, k, v, gate, f=f: cross_attention(q, k, v, gate=gate, backend=f))
              for f in _fused(device)]
    gated.append(Candidate("F.sdpa * sigmoid", lambda q, k, v, gate: reference.sdpa_cross_attention(
        q, k, v, gate=gate), "builtin"))
    out.append(Case(op="cross_attention", shape=f"B{b} H{heads} N{n} D{hd} gated", make_inputs=make_gated,
                    candidates=gated, reference64=lambda q, k, v, gate: reference.cross_attention(q, k, v, None, gate),
                    flops=flops, forward_flops=fwd_flops))
    return out
