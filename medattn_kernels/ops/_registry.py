"""What every op shares: backend choice, registration with torch.library, and autograd.

Each op module (medattn_kernels/ops/<op>.py) describes itself once with a `FusedOp`:
the schema name, its fake kernel, how autograd saves and differentiates it (`setup_context` and
`backward`, written against an abstract `backward_fn` with the signature of the `<op>_backward`
schema), and the forward/backward launchers of each non-C++ backend. From that one description this
module

* registers the fake kernels, an Autograd-key kernel and the Python CUDA kernels on
  `torch.ops.medattn.<op>` / `<op>_backward` (when the compiled extension defines them);
* runs the registered op and an explicitly chosen backend (Triton on CPU tensors under
  TRITON_INTERPRET=1, or a specific GPU backend) alike through one generic autograd.Function
  (_FusedFunction) that calls the op's `setup_context`/`backward`;
* answers `info()`.

Backend choice (the rule, NATTEN/xformers style, each case with its reason):

* MEDATTN_FORCE_REFERENCE=1 in the environment: the reference everywhere (debugging a model).
* backend=None, CPU tensors: the C++ kernel ("cpu") when it is built and supports the dtype, else the
  reference (the only other CPU path; Triton on CPU is an interpreter for tests, not a backend to run).
* backend=None, CUDA tensors: the registered op, whose CUDA kernel picks Triton or CUDA C++ per shape
  (each op documents its rule); Triton directly when the extension is missing; else the reference.
* An explicit backend is honoured or refused with a RuntimeError saying why; never silently replaced.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch

from .. import _extension

BACKENDS = ("reference", "cpu", "triton", "cuda")
FORCE_REFERENCE_ENV = "MEDATTN_FORCE_REFERENCE"
_OPS: Dict[str, "FusedOp"] = {}

CPU_DTYPES = (torch.float32, torch.float64, torch.bfloat16)
GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def force_reference() -> bool:
    return os.environ.get(FORCE_REFERENCE_ENV, "0") not in ("", "0", "false", "False")


def triton_status(device: Optional[torch.device] = None) -> Tuple[bool, str]:
    """Can Triton kernels run on tensors of `device` (None: on this machine at all)?"""
    try:
        import triton  # noqa: F401
    except ImportError as exc:
        return False, f"triton is not installed ({exc})"
    interpret = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if device is not None and device.type == "cpu":
        return (True, "interpreter") if interpret else (False, "CPU tensors need TRITON_INTERPRET=1")
    if torch.cuda.is_available() or interpret:
        return True, "interpreter" if interpret and not torch.cuda.is_available() else "GPU"
    return False, "no CUDA GPU (set TRITON_INTERPRET=1 to run the kernels on CPU tensors)"


_KERNEL_CACHE: Dict[Tuple[str, str], bool] = {}


def _has_kernel(qualname: str, key: str) -> bool:
    """Is a kernel registered for qualname under dispatch key `key`? Registrations happen at import,
    so the answer is cached (which also keeps torch.compile from tracing the dispatcher query)."""
    if (qualname, key) not in _KERNEL_CACHE:
        try:
            _KERNEL_CACHE[qualname, key] = torch._C._dispatch_has_kernel_for_dispatch_key(qualname, key)
        except RuntimeError:  # schema not registered (extension missing or stale)
            _KERNEL_CACHE[qualname, key] = False
    return _KERNEL_CACHE[qualname, key]


def _dtype_list(dtypes: Sequence[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


@dataclass
class FusedOp:
    """One op's description; see the module docstring."""

    name: str
    fake: Callable
    setup_context: Callable  # (ctx, op_inputs, op_output) -> None
    backward: Callable  # (ctx, backward_fn, *grads_of_outputs) -> grads of op inputs
    backward_fake: Callable
    triton: Optional[Tuple[Callable, Callable]] = None  # (forward, backward) with the schemas' signatures
    cuda_cpp: bool = False  # has medattn::_cuda_<name>(_backward) kernels in csrc/cuda
    choose_gpu: Optional[Callable] = None  # (*op_inputs) -> "triton" | "cuda": the per-shape rule
    cpu_dtypes: Tuple[torch.dtype, ...] = CPU_DTYPES
    gpu_dtypes: Tuple[torch.dtype, ...] = GPU_DTYPES
    _registered: bool = field(default=False, init=False)
    _op_overload: Optional[Callable] = field(default=None, init=False)  # set by register()
    _backward_overload: Optional[Callable] = field(default=None, init=False)
    _schema_defaults: tuple = field(default=(), init=False)  # each schema argument's default (None if none)

    # ---- torch.ops handles
    @property
    def qualname(self) -> str:
        return f"medattn::{self.name}"

    @property
    def defined(self) -> bool:
        return _extension._C is not None and hasattr(torch.ops.medattn, self.name)

    def op(self):
        return getattr(torch.ops.medattn, self.name).default

    def backward_op(self):
        return getattr(torch.ops.medattn, f"{self.name}_backward").default

    # ---- launchers per backend, with the schemas' signatures
    def forward_impl(self, backend: str) -> Callable:
        if backend == "triton":
            return self.triton[0]
        if backend == "cuda":
            return getattr(torch.ops.medattn, f"_cuda_{self.name}").default
        if backend == "cpu":
            return self.op()
        raise AssertionError(backend)

    def backward_impl(self, backend: str) -> Callable:
        if backend == "triton":
            return self.triton[1]
        if backend == "cuda":
            return getattr(torch.ops.medattn, f"_cuda_{self.name}_backward").default
        if backend == "cpu":
            return self.backward_op()
        raise AssertionError(backend)

    # ---- availability, device-independent (for info()) and per tensor (for resolve())
    def cpu_kernel_ready(self) -> bool:
        """Is the C++ CPU kernel built and registered? (status("cpu") without its message: resolve() runs
        on every call, and at a U-Net's small maps formatting the message cost a tenth of the kernel.)"""
        return _extension._C is not None and _has_kernel(self.qualname, "CPU")

    def status(self, backend: str, device: Optional[torch.device] = None) -> Tuple[bool, str]:
        if backend == "reference":
            return True, "pure PyTorch, any device and dtype"
        if backend == "cpu":
            if device is not None and device.type != "cpu":
                return False, f"the C++ CPU kernel needs CPU tensors, got {device}"
            if self.cpu_kernel_ready():
                return True, f"C++ ({_dtype_list(self.cpu_dtypes)})"
            if _extension._C is None:
                return False, _extension.LOAD_ERROR
            return False, "the built extension predates this op: rebuild it"
        if backend == "triton":
            if self.triton is None:
                return False, "no Triton kernel for this op"
            ok, why = triton_status(device)
            return ok, f"Triton on {why} ({_dtype_list(self.gpu_dtypes)})" if ok else why
        if backend == "cuda":
            if not self.cuda_cpp:
                return False, "no CUDA C++ kernel for this op (Triton serves the GPU)"
            if device is not None and device.type != "cuda":
                return False, f"the CUDA kernel needs CUDA tensors, got {device}"
            if not torch.cuda.is_available():
                return False, "no CUDA GPU"
            if not _has_kernel(f"medattn::_cuda_{self.name}", "CUDA"):
                return False, "the extension was built without CUDA sources (MEDATTN_BUILD_CUDA=1 to force)"
            return True, f"CUDA C++ ({_dtype_list(self.gpu_dtypes)})"
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")

    def resolve(self, backend: Optional[str], tensor: torch.Tensor, name: str = "input") -> str:
        """The backend that runs for `tensor` ('reference', 'cpu', 'triton', 'cuda' or 'op' = the
        registered op dispatching on device); raises RuntimeError/TypeError when an explicit choice
        cannot run."""
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
        if force_reference() or backend == "reference":
            return "reference"
        device, dtype = tensor.device, tensor.dtype
        if backend is None:
            if device.type == "cpu":
                ok = self.cpu_kernel_ready() and dtype in self.cpu_dtypes
                return "cpu" if ok else "reference"
            if device.type == "cuda" and dtype in self.gpu_dtypes:
                if self.defined:
                    return "op"
                if self.status("triton", device)[0]:
                    return "triton"
            return "reference"
        ok, why = self.status(backend, device)
        if not ok:
            raise RuntimeError(f"{self.name}: backend {backend!r} is not available: {why}")
        allowed = self.cpu_dtypes if backend == "cpu" else self.gpu_dtypes
        if dtype not in allowed:
            raise TypeError(f"{name}: backend {backend!r} of {self.name} supports {_dtype_list(allowed)}, "
                            f"got {str(dtype).replace('torch.', '')}")
        return backend

    def run(self, backend: str, *op_inputs):
        """Run the op with an already-resolved (non-reference) backend, with autograd."""
        if backend in ("op", "cpu"):
            return self.op()(*op_inputs)
        launch = _Launch(self, self.forward_impl(backend), self.backward_impl(backend))
        return _FusedFunction.apply(launch, *op_inputs)

    def _autograd_kernel(self, keyset, *op_inputs):
        """The Autograd-key kernel of torch.ops.medattn.<op>: what torch.library.register_autograd
        generates, minus the generality our schemas do not use (keyword-only and out= arguments, tensor
        lists: register() refuses them), and with the schema's defaults looked up once at registration
        instead of per call. At a U-Net's small maps that per-call work cost as much as an activated batch
        norm's kernel."""
        if len(op_inputs) < len(self._schema_defaults):  # the dispatcher drops trailing default arguments
            op_inputs = op_inputs + self._schema_defaults[len(op_inputs):]
        forward = functools.partial(_run_below_autograd, self._op_overload, keyset)
        if torch.is_grad_enabled() and torch._C._any_requires_grad(*op_inputs):
            return _FusedFunction.apply(_Launch(self, forward, self._backward_overload), *op_inputs)
        return forward(*op_inputs)

    # ---- registration with torch.library (once, at import of the op module)
    def register(self) -> "FusedOp":
        if self.defined and not self._registered:  # refuse before registering anything
            self._schema_defaults = self._supported_schema_defaults()
        _OPS[self.name] = self
        if not self.defined or self._registered:
            return self
        for qualname, key in ((self.qualname, "CPU"), (f"medattn::_cuda_{self.name}", "CUDA")):
            _has_kernel(qualname, key)  # fill the cache before any torch.compile trace
        torch.library.register_fake(self.qualname)(self.fake)
        torch.library.register_fake(f"{self.qualname}_backward")(self.backward_fake)
        if self.cuda_cpp and hasattr(torch.ops.medattn, f"_cuda_{self.name}"):
            torch.library.register_fake(f"medattn::_cuda_{self.name}")(self.fake)
            torch.library.register_fake(f"medattn::_cuda_{self.name}_backward")(self.backward_fake)
        self._op_overload, self._backward_overload = self.op(), self.backward_op()
        _AUTOGRAD_LIBRARY.impl(self.name, self._autograd_kernel, "Autograd", with_keyset=True)
        if self.triton is not None or self.cuda_cpp:
            torch.library.register_kernel(self.qualname, "cuda")(self._gpu_forward)
            torch.library.register_kernel(f"{self.qualname}_backward", "cuda")(self._gpu_backward)
        self._registered = True
        return self

    def _supported_schema_defaults(self) -> tuple:
        """Each argument's default (None where it has none), for _autograd_kernel; RuntimeError for a schema
        it does not handle."""
        schema = self.op()._schema
        tensor_lists = any(torch._library.utils.is_tensorlist_like_type(a.type)
                           for a in (*schema.arguments, *schema.returns))
        if tensor_lists or any(a.kwarg_only for a in schema.arguments):
            raise RuntimeError(f"{self.qualname}: keyword-only arguments and tensor lists are not supported by "
                               "FusedOp._autograd_kernel (torch.library.register_autograd handles them)")
        return tuple(a.default_value for a in schema.arguments)

    def _gpu_choice(self, *op_inputs) -> str:
        cuda_ok = self.cuda_cpp and _has_kernel(f"medattn::_cuda_{self.name}", "CUDA")
        if self.triton is None:
            return "cuda"
        if not cuda_ok:
            return "triton"
        return self.choose_gpu(*op_inputs) if self.choose_gpu is not None else "triton"

    def _gpu_forward(self, *op_inputs):
        return self.forward_impl(self._gpu_choice(*op_inputs))(*op_inputs)

    def _gpu_backward(self, *bw_inputs):
        # The rule looks at the forward's inputs; backward schemas carry them after the gradients,
        # so each op's chooser accepts the backward's arguments too (see its docstring).
        return self.backward_impl(self._gpu_choice(*bw_inputs))(*bw_inputs)


def _run_below_autograd(op, keyset, *op_inputs):
    """The registered kernel below the Autograd key (CPU, CUDA, or a tracing mode's), with nested ops
    not recorded by autograd, as torch.library's generated kernels do."""
    with torch._C._AutoDispatchBelowAutograd():
        return op.redispatch(keyset & torch._C._after_autograd_keyset, *op_inputs)


class _Launch(NamedTuple):
    """One call's autograd node: the op's description and the launchers of its forward and backward
    (with the <op> and <op>_backward schemas' signatures)."""

    spec: "FusedOp"
    forward: Callable
    backward: Callable


class _FusedFunction(torch.autograd.Function):
    """Autograd for every op and backend (the registered op's Autograd kernel and an explicitly chosen
    backend alike): the op's own setup_context saves what its backward formula needs, and the formula
    runs on the launch's backward. The launch is the one input before the op's (see needs_grad)."""

    @staticmethod
    def forward(ctx, launch: _Launch, *op_inputs):
        outputs = launch.forward(*op_inputs)
        launch.spec.setup_context(ctx, op_inputs, outputs)
        ctx.medattn_launch = launch
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        launch = ctx.medattn_launch
        return (None, *launch.spec.backward(ctx, launch.backward, *grads))


_AUTOGRAD_LIBRARY = torch.library.Library("medattn", "FRAGMENT")  # holds the Autograd kernels (kept alive)


def registered_ops() -> Dict[str, FusedOp]:
    return dict(_OPS)


def info_rows() -> list:
    """(op, backend, available, detail) for every op and backend."""
    rows = []
    for name, spec in sorted(_OPS.items()):
        for backend in BACKENDS:
            ok, why = spec.status(backend)
            rows.append((name, backend, ok, why))
    return rows


def needs_grad(ctx, index: int) -> bool:
    """ctx.needs_input_grad for the op's index-th input (_FusedFunction's first input is the launch)."""
    return bool(ctx.needs_input_grad[index + 1])


def zeros_if_none(grad: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Autograd passes None for an output that did not reach the loss."""
    return torch.zeros_like(like) if grad is None else grad


def none_if_absent(t: torch.Tensor) -> Optional[torch.Tensor]:
    """Backward ops return [0]-shaped tensors for absent gradients (csrc/ops.cpp); autograd wants None."""
    return None if t.dim() == 1 and t.numel() == 0 else t


__all__ = ["FusedOp", "BACKENDS", "FORCE_REFERENCE_ENV", "registered_ops", "info_rows", "triton_status",
           "needs_grad", "zeros_if_none", "none_if_absent", "CPU_DTYPES", "GPU_DTYPES", "force_reference"]
