"""Recorded Triton launches -> the specializations the JIT would compile -> sm_XX cubins and their resources.

`specialize` runs triton's own argument binder (the code `kernel[grid](...)` runs before compiling) on a
recorded `Launch`, for a `GPUTarget` instead of the active driver's: same signature types, same
constexprs (including ints specialized to 1), same alignment / divisibility attributes, same options.
`compile_one` compiles it with `triton.compile` and reads shared memory from the metadata and registers
and spills from the ptxas -v log of triton's own ptxas run (TRITON_DUMP_PTXAS_LOG=1, printed to
stdout, captured). Nothing touches a driver, so this runs on machines without a GPU.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

from .targets import Target

os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"

_REGISTERS = re.compile(r"Used (\d+) registers")
_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


@dataclass(frozen=True)
class Specialization:
    """What the JIT would compile for one launch on one target; `key` identifies it (dedup)."""

    kernel: Any  # triton JITFunction
    target: Target
    signature: Dict[str, str]
    constexprs: Dict[Tuple[int, ...], Any]
    attrs: Dict[Tuple[int, ...], Any]
    options: Dict[str, Any]

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def key(self) -> str:
        return repr((self.kernel.fn.__module__, self.name, self.target.arch, sorted(self.signature.items()),
                     sorted(self.constexprs.items()), sorted(self.attrs.items()), self.options["num_warps"],
                     self.options["num_stages"]))

    @property
    def args_hash(self) -> str:
        """6 hex digits naming the JIT's argument specialization (types, ints specialized to 1, 16-divisible
        ints and aligned pointers): rows with the same constexprs differ here."""
        kernel_constexprs = set(self.named_constexprs())
        names = [p.name for p in self.kernel.params]
        ints = sorted((names[k[0]], v) for k, v in self.constexprs.items() if names[k[0]] not in kernel_constexprs)
        text = repr((sorted(self.signature.items()), ints, sorted(self.attrs.items())))
        return hashlib.sha256(text.encode()).hexdigest()[:6]

    def named_constexprs(self) -> Dict[str, Any]:
        """The launcher's constexprs by name (ints the JIT specialized to constexpr are left out)."""
        names = [p.name for p in self.kernel.params]
        return {names[path[0]]: v for path, v in sorted(self.constexprs.items())
                if self.kernel.params[path[0]].is_constexpr}

    def dtype(self) -> str:
        """The element type of the first pointer argument (the op's dtype for every kernel here)."""
        return next((t[1:] for t in self.signature.values() if t.startswith("*")), "-")


def specialize(launch, target: Target) -> Specialization:
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    kernel = launch.kernel
    backend = make_backend(target.gpu_target())
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(launch.constexprs, num_warps=launch.num_warps, num_stages=launch.num_stages, debug=False)
    bound, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return Specialization(kernel, target, signature, constexprs, attrs, dict(options.__dict__))


@dataclass
class Resources:
    shared: Optional[int] = None  # bytes of shared memory per block (triton's metadata.shared)
    registers: Optional[int] = None  # per thread
    spill_stores: Optional[int] = None  # bytes per thread
    spill_loads: Optional[int] = None
    num_warps: Optional[int] = None  # after compilation (warp specialization may change it)
    seconds: float = 0.0
    error: Optional[str] = None


def parse_ptxas_log(log: str) -> Tuple[Optional[int], Optional[int], Optional[int]]:
    """(registers, spill store bytes, spill load bytes) of the one function in a ptxas -v log."""
    regs, spills = _REGISTERS.search(log), _SPILLS.search(log)
    if regs is None or spills is None:
        return None, None, None
    return int(regs.group(1)), int(spills.group(2)), int(spills.group(3))


def _short_error(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return f"{type(exc).__name__}: {' | '.join(lines[:3])[:300]}"


def compile_one(spec: Specialization) -> Resources:
    import triton
    from triton.compiler import ASTSource

    start = time.perf_counter()
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(spec.kernel, spec.signature, spec.constexprs, spec.attrs),
                                      target=spec.target.gpu_target(), options=spec.options)
    except Exception as exc:  # a compile error is a finding, reported in the table
        return Resources(error=_short_error(exc), seconds=time.perf_counter() - start)
    regs, stores, loads = parse_ptxas_log(log.getvalue())
    res = Resources(shared=int(compiled.metadata.shared), registers=regs, spill_stores=stores, spill_loads=loads,
                    num_warps=int(compiled.metadata.num_warps), seconds=time.perf_counter() - start)
    if regs is None:
        res.error = "no ptxas -v log captured (TRITON_DUMP_PTXAS_LOG ignored by this triton?)"
    return res
