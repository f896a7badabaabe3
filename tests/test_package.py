"""Package-level behaviour: info(), the missing-extension fallback, the reference override, the
benchmark CLI."""
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch

import medattn_kernels as mk
from medattn_kernels.ops._registry import BACKENDS, registered_ops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, env_extra=None) -> subprocess.CompletedProcess:
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_info_lists_every_op_and_backend(capsys):
    rows = mk.info()
    printed = capsys.readouterr().out
    ops = registered_ops()
    assert "global_spatial_attention" in ops
    assert {(op, b) for op, b, _, _ in rows} == {(op, b) for op in ops for b in BACKENDS}
    for op, backend, ok, detail in rows:
        assert detail, f"{op}/{backend} has no reason"
        assert op in printed
    assert ("global_spatial_attention", "cpu", True) in {(o, b, ok) for o, b, ok, _ in rows}


def test_imports_without_extension_and_says_why():
    # A None entry in sys.modules makes `from . import _C` raise ImportError, as a missing build would.
    proc = run_python("""
        import sys, warnings
        sys.modules["medattn_kernels._C"] = None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import medattn_kernels as mk
        assert any("_C could not be imported" in str(w.message) for w in caught), [str(w.message) for w in caught]
        rows = {(op, b): (ok, why) for op, b, ok, why in mk.info(print_table=False)}
        ok, why = rows[("global_spatial_attention", "cpu")]
        assert not ok and "pip install -e ." in why, why
        import torch
        x = torch.randn(2, 3, 4, 5, requires_grad=True)
        out = mk.global_spatial_attention(x)          # falls back to the reference
        ref = x * torch.sigmoid(x.mean(1, keepdim=True))
        assert torch.allclose(out, ref)
        try:
            mk.global_spatial_attention(x, backend="cpu")
        except RuntimeError as e:
            assert "backend 'cpu' is not available" in str(e)
        else:
            raise AssertionError("explicit cpu backend without the extension must fail")
        print("fallback ok")
    """)
    assert proc.returncode == 0, proc.stderr
    assert "fallback ok" in proc.stdout


def test_extension_without_the_op_falls_back_and_says_why(monkeypatch):
    """An extension built before an op was added has no CPU kernel for it: backend=None runs the
    reference, an explicit "cpu" is refused with the reason, and info() gives the same reason."""
    from medattn_kernels import _extension
    from medattn_kernels.ops import _registry
    from medattn_kernels.ops.global_spatial_attention import SPEC
    x = torch.randn(2, 3, 4, 5)
    if _extension._C is None:  # stands in for an extension that imports
        monkeypatch.setattr(_extension, "_C", types.SimpleNamespace())
    monkeypatch.setitem(_registry._KERNEL_CACHE, (SPEC.qualname, "CPU"), False)
    assert not SPEC.cpu_kernel_ready()
    assert SPEC.resolve(None, x, "x") == "reference"
    ok, why = SPEC.status("cpu", x.device)
    assert not ok and "rebuild" in why, why
    with pytest.raises(RuntimeError, match="backend 'cpu' is not available: the built extension predates"):
        SPEC.resolve("cpu", x, "x")
    rows = {(op, b): (ok, why) for op, b, ok, why in mk.info(print_table=False)}
    assert rows[("global_spatial_attention", "cpu")] == (False, why)


def test_stale_source_check(tmp_path, monkeypatch):
    """The rebuild warning compares the built _C with the C++ sources beside the package (an editable
    install); an installed wheel has none there and must import quietly, not fail on a missing file."""
    from medattn_kernels import _extension
    built_so = tmp_path / "medattn_kernels" / "_C.so"  # stands in for the built extension
    built_so.parent.mkdir()
    built_so.write_bytes(b"")
    monkeypatch.setattr(_extension, "_C", types.SimpleNamespace(__file__=str(built_so)))
    monkeypatch.setattr(_extension, "_PACKAGE_DIR", built_so.parent)
    assert _extension._stale_sources() == []
    (tmp_path / "csrc" / "cpu").mkdir(parents=True)
    for name in ("ops.cpp", "dispatch.cpp", "cpu/new_op.cpp"):
        (tmp_path / "csrc" / name).write_text("// newer than _C")
    built = os.path.getmtime(built_so)
    os.utime(tmp_path / "csrc" / "ops.cpp", (built - 10, built - 10))
    os.utime(tmp_path / "csrc" / "dispatch.cpp", (built - 10, built - 10))
    os.utime(tmp_path / "csrc" / "cpu" / "new_op.cpp", (built + 10, built + 10))
    assert _extension._stale_sources() == [os.path.join("csrc", "cpu", "new_op.cpp")]


def test_force_reference_everywhere():
    proc = run_python("""
        import torch, medattn_kernels as mk
        x = torch.randn(1, 2, 3, 3, requires_grad=True)
        out = mk.global_spatial_attention(x, backend="cpu")
        print(type(out.grad_fn).__name__)
    """, {"MEDATTN_FORCE_REFERENCE": "1"})
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("Mul")


def test_bench_cli_writes_table_json_csv(tmp_path):
    from medattn_kernels.bench.cli import main
    rc = main(["--ops", "global_spatial_attention", "--quick", "--reps", "3", "--budget", "0.5",
               "--out", str(tmp_path)])
    assert rc == 0
    data = json.loads((tmp_path / "global_spatial_attention_cpu_float32.json").read_text())
    rows = data["results"]
    backends = {r["backend"] for r in rows}
    assert {"reference (eager)", "torch.compile(reference)", "medattn cpu"} <= backends
    assert data["meta"]["peak_sgemm_gflops"] > 0 and data["meta"]["peak_copy_gbps"] > 0
    if mk._extension._C is not None:  # the vector FMA rate comes from the compiled extension
        assert data["meta"]["peak_vector_fma_gflops"] > 0
    assert "ISA pass" in data["meta"]["device"]
    for r in rows:
        assert not r["error"], r["error"]
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["max_rel_err"] < 1e-5
        assert r["gbps"] > 0 and r["pct_peak"] > 0
        if r["backend"] == "medattn cpu":
            assert r["saved_mib"] == 0.0 and r["vs_reference"] > 0 and r["vs_builtin"] > 0
            assert r["best_builtin"] in ("reference (eager)", "torch.compile(reference)")
    assert (tmp_path / "global_spatial_attention_cpu_float32.csv").read_text().startswith("op,shape,backend")


def test_bench_cli_rejects_unknown_op(capsys):
    from medattn_kernels.bench.cli import main
    assert main(["--ops", "no_such_op"]) == 2
    assert "unknown op" in capsys.readouterr().err


@pytest.mark.skipif(not registered_ops()["cross_attention"].cpu_kernel_ready(),
                    reason="needs the compiled extension (the registered op)")
def test_registered_autograd_fills_omitted_default_arguments():
    """The dispatcher drops trailing arguments equal to their schema defaults before the Autograd kernel
    (FusedOp._autograd_kernel) sees them; the op's setup_context and backward still get every argument."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 5, dtype=torch.float64, requires_grad=True) for _ in range(3))
    grad = torch.randn(2, 3, 7, 5, dtype=torch.float64)
    out_omitted, _ = torch.ops.medattn.cross_attention(q, k, v)  # scale=None, gate=None dropped
    grads_omitted = torch.autograd.grad(out_omitted, (q, k, v), grad)
    ref = mk.reference.cross_attention(q, k, v)
    grads_ref = torch.autograd.grad(ref, (q, k, v), grad)
    torch.testing.assert_close(out_omitted, ref)
    for got, want in zip(grads_omitted, grads_ref):
        torch.testing.assert_close(got, want)
    tensors = [torch.randn(1, 2, n, 4, dtype=torch.float64, requires_grad=True) for n in (5, 5, 5, 6, 6, 6)]
    o_a, o_b, _, _ = torch.ops.medattn.bidirectional_cross_attention(*tensors)  # scale=None dropped
    got = torch.autograd.grad((o_a * o_a).sum() + o_b.sum(), tensors)
    r_a, r_b = mk.reference.bidirectional_cross_attention(*tensors)
    want = torch.autograd.grad((r_a * r_a).sum() + r_b.sum(), tensors)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)
    with torch.no_grad():  # inputs that require grad, grad mode off: the kernel runs without a node
        assert torch.ops.medattn.cross_attention(q, k, v)[0].grad_fn is None


@pytest.mark.skipif(not registered_ops()["cross_attention"].cpu_kernel_ready(),
                    reason="needs the compiled extension (the medattn namespace)")
@pytest.mark.parametrize("schema", ["(Tensor[] xs) -> Tensor", "(Tensor x, *, float alpha) -> Tensor"])
def test_registry_refuses_schemas_its_autograd_kernel_does_not_handle(schema):
    from medattn_kernels.ops._registry import FusedOp
    name = "_test_tensor_list" if "[]" in schema else "_test_kwarg_only"
    lib = torch.library.Library("medattn", "FRAGMENT")
    lib.define(name + schema)
    lib.define(name + "_backward(Tensor grad) -> Tensor")
    spec = FusedOp(name=name, fake=lambda *a, **k: None, setup_context=lambda *a: None,
                   backward=lambda *a: None, backward_fake=lambda *a: None)
    with pytest.raises(RuntimeError, match="keyword-only arguments and tensor lists are not supported"):
        spec.register()
    assert not spec._registered and name not in registered_ops()
