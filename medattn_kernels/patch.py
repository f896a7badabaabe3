"""patch(model) / unpatch(model): run the fused ops inside a model you already have, without changing it.

One mechanism, many patchers (Liger-Kernel's ``apply_liger_kernel_to_*`` is the model). A `Patcher` names
the module types it serves (matched by exact type: a subclass may override ``forward``), the op it runs,
why a module of those types cannot be patched (a configuration the op does not compute), and the patched
forward. `patch` walks the model and, for every matching module *instance*, binds the patched forward to
that instance (``module.forward``), so

* the module objects, their types, parameter names, buffers and state dicts stay exactly as they were
  (optimisers, checkpoints and hooks keep working; a state dict loads into and out of a patched model);
* the patched forward computes the stock function on the stock parameters; where a call cannot run on
  the fused op (a condition known only per call: eval-mode statistics, an attention mask, attention
  dropout in training, a dtype without a fused kernel...) it runs the stock forward for that call and
  counts the reason (``patch_state(module).calls``);
* `unpatch` deletes the instance attribute: the class's own forward is back.

Patchers: the depthwise ``nn.Conv2d`` one here (-> ``depthwise_conv2d``); MONAI's blocks in
``medattn_kernels/integrations/monai.py``, registered when ``monai`` has been imported (a model cannot
hold MONAI modules otherwise). Limits: patch before wrapping a model in ``torch.compile``; ``nn.DataParallel``
replicas would call the original instance's bound forward (use DistributedDataParallel, which does not
replicate modules); save checkpoints as state dicts (a pickled patched module reloads unpatched).
"""
from __future__ import annotations

import sys
import types
import warnings
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import nn

from .ops._registry import BACKENDS, registered_ops

FUSED = "fused"  # the calls counter's key for calls that ran on the fused op


@dataclass(frozen=True)
class Patcher:
    """How one kind of module runs on a fused op.

    name: the module kind, as the report shows it (``"nn.Conv2d (depthwise)"``, ``"monai SABlock"``).
    op: the fused op the patched forward runs (a ``medattn_kernels`` op name).
    types: the classes patched, by exact type.
    applies: which modules this patcher speaks for (default: instances of `types`, subclasses included);
        each of them is reported, patched or not, with the reason.
    unsupported: ``(module) -> reason or None``: why this configuration cannot run on the op (checked once,
        at patch time).
    forward: ``(module, *args, **kwargs) -> output``: the patched forward; calls ``stock_forward(module,
        reason, ...)`` where a call cannot use the op.
    per_call: when the patched forward runs the stock forward, for the report ("" = never).
    describe: ``(module) -> str`` detail of what runs fused, for the report.
    via: for a container served by patching a child (``"attn"``): no forward of its own; its report row
        mirrors the child's.
    """

    name: str
    op: str
    types: Tuple[type, ...]
    forward: Optional[Callable] = None
    unsupported: Callable[[nn.Module], Optional[str]] = lambda module: None
    applies: Optional[Callable[[nn.Module], bool]] = None
    per_call: str = ""
    describe: Callable[[nn.Module], str] = lambda module: ""
    via: Optional[str] = None

    def speaks_for(self, module: nn.Module) -> bool:
        return self.applies(module) if self.applies is not None else isinstance(module, self.types)


@dataclass
class PatchState:
    """What `patch` leaves on a patched instance (``module._medattn_patch``)."""

    patcher: Patcher
    backend: Optional[str]
    calls: Counter = field(default_factory=Counter)  # FUSED or a fallback reason -> number of calls


@dataclass(frozen=True)
class PatchRow:
    module: str  # path in the model ("" = the model itself)
    type: str
    op: str
    patched: bool
    detail: str  # patched: what runs fused; left alone: why
    new: bool = True  # patched by this call (False: already patched before, or served through a child: "via")


class PatchReport:
    """What `patch` did: one row per module a patcher speaks for, patched or left alone with its reason.
    ``print(report)`` shows the table; ``report.patched`` / ``report.left_alone`` are the rows;
    ``len(report)`` (also ``int(report)``) is the number of modules patched, which `patch` returned
    before issue 11 (comparing the report with an int still works, with a DeprecationWarning)."""

    def __init__(self, model_name: str, rows: Optional[List[PatchRow]] = None):
        self.model_name = model_name
        self.rows: List[PatchRow] = list(rows or [])
        self.per_call: Dict[str, str] = {}  # patched type -> when its patched forward runs the stock one

    @property
    def patched(self) -> List[PatchRow]:
        return [r for r in self.rows if r.patched and r.new]

    @property
    def left_alone(self) -> List[PatchRow]:
        return [r for r in self.rows if not r.patched]

    def __len__(self) -> int:
        return len(self.patched)

    def __int__(self) -> int:
        return len(self)

    __index__ = __int__

    def __eq__(self, other):
        if isinstance(other, int) and not isinstance(other, bool):
            warnings.warn("patch() returns a PatchReport: compare len(report) with a count",
                          DeprecationWarning, stacklevel=2)
            return len(self) == other
        return NotImplemented

    __hash__ = object.__hash__

    def by_op(self) -> Dict[str, int]:
        return dict(Counter(r.op for r in self.patched))

    def table(self) -> str:
        header = ("module", "type", "op", "result", "detail")
        cells = [(r.module or "(model)", r.type, r.op, "patched" if r.patched else "left alone", r.detail)
                 for r in self.rows]
        widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(header[:-1])]
        line = lambda c: "  ".join(v.ljust(w) for v, w in zip(c[:-1], widths)) + "  " + c[-1]  # noqa: E731
        ops = ", ".join(f"{op} x{n}" for op, n in sorted(self.by_op().items())) or "none"
        title = (f"medattn_kernels.patch({self.model_name}): {len(self)} modules patched ({ops}), "
                 f"{len(self.left_alone)} left alone")
        notes = [f"{kind} runs its stock forward for a call when {when}" for kind, when in self.per_call.items()]
        return "\n".join([title, line(header), line(tuple("-" * len(h) for h in header))]
                         + [line(c) for c in cells] + notes)

    __str__ = table

    def __repr__(self) -> str:
        return f"<PatchReport {self.model_name}: {len(self)} patched, {len(self.left_alone)} left alone>"


_PATCHERS: List[Patcher] = []


def register_patcher(patcher: Patcher) -> Patcher:
    """Add a patcher (integrations call this at import); a patcher of the same name is replaced."""
    _PATCHERS[:] = [p for p in _PATCHERS if p.name != patcher.name] + [patcher]
    return patcher


def patchers() -> List[Patcher]:
    """The registered patchers, MONAI's included when monai has been imported."""
    _load_integrations()
    return list(_PATCHERS)


def _load_integrations() -> None:
    if "monai" in sys.modules:  # MONAI blocks exist only once monai is imported; importing it costs seconds
        from .integrations import monai  # noqa: F401


def patch_state(module: nn.Module) -> Optional[PatchState]:
    """The patch on this instance (its patcher and per-call counts), or None."""
    return module.__dict__.get("_medattn_patch")


def stock_forward(module: nn.Module, reason: str, *args, **kwargs):
    """Run the class's own forward for this call, counting why (see `PatchState.calls`)."""
    count_call(module, reason)
    return type(module).forward(module, *args, **kwargs)


def count_fused(module: nn.Module) -> None:
    count_call(module, FUSED)


def count_call(module: nn.Module, key: str) -> None:
    """Count a call of a patched module's forward (or of one op inside it) under `key`: FUSED or the reason
    it ran the stock computation. Not counted while torch.compile traces."""
    state = patch_state(module)
    if state is not None and not torch.compiler.is_compiling():
        state.calls[key] += 1


def op_backend(module: nn.Module) -> Optional[str]:
    """The backend the patched forward passes to the op (None: the fastest available)."""
    state = patch_state(module)
    return state.backend if state is not None else None


def fused_kernel_for(op: str, dtype: torch.dtype, device: torch.device, backend: Optional[str]) -> bool:
    """Does a fused kernel (not the reference) serve `op` for this dtype and device? An explicit backend
    is taken as asked (the op raises if it cannot run)."""
    if backend is not None:
        return backend != "reference"
    return registered_ops()[op].resolve(None, torch.empty(0, dtype=dtype, device=device)) != "reference"


def _bind(module: nn.Module, patcher: Patcher, backend: Optional[str]) -> None:
    def forward(self, *args, **kwargs):
        return patcher.forward(self, *args, **kwargs)

    module.__dict__["_medattn_patch"] = PatchState(patcher, backend)
    module.forward = types.MethodType(forward, module)


def _op_names(ops) -> Optional[set]:
    if ops is None:
        return None
    names = {ops} if isinstance(ops, str) else set(ops)
    known = set(registered_ops())
    unknown = sorted(names - known)
    if unknown:
        raise ValueError(f"ops: expected names of medattn_kernels ops {sorted(known)}, got unknown {unknown}")
    return names


def patch(model: nn.Module, ops: Optional[Iterable[str]] = None, *, backend: Optional[str] = None,
          fused: Optional[bool] = None) -> PatchReport:
    """Run the fused ops inside `model`, in place: every module a registered patcher serves (by exact type)
    gets a patched forward on the same instance; parameters, buffers and state dict are unchanged.

    Args:
        model: any nn.Module (the model itself may be a patched module).
        ops: op names to use (e.g. ``["cross_attention"]``); None: every op. Modules of other ops are
            reported as left alone.
        backend: passed to every op (None: the fastest available; ``"reference"`` runs the pure-PyTorch
            references, for debugging).
        fused: deprecated (before issue 11): ``fused=False`` is ``backend="reference"``.

    Returns a `PatchReport` (``print(report)`` for the table); ``len(report)`` modules were patched.
    Undo with `unpatch`. Patching twice leaves already patched modules as they are.
    """
    if isinstance(ops, bool):  # the pre-issue-11 signature was patch(model, fused)
        fused, ops = ops, None
    if fused is not None:
        warnings.warn("patch(model, fused=...) is deprecated: use backend='reference' for fused=False",
                      DeprecationWarning, stacklevel=2)
        if not fused:
            backend = "reference"
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS} or None, got {backend!r}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    wanted = _op_names(ops)
    active = patchers()
    report = PatchReport(type(model).__name__)
    via_rows: List[Tuple[int, str, nn.Module, Patcher]] = []
    for path, module in model.named_modules():
        patcher = next((p for p in active if p.speaks_for(module)), None)
        if patcher is None:
            continue
        kind = type(module).__name__
        if patcher.via is not None:
            via_rows.append((len(report.rows), path, module, patcher))
            report.rows.append(PatchRow(path, kind, patcher.op, False, ""))
            continue
        if patch_state(module) is not None:
            report.rows.append(PatchRow(path, kind, patcher.op, True, "already patched", new=False))
            continue
        if isinstance(module, patcher.types) and type(module) not in patcher.types:
            reason = (f"subclass of {'/'.join(t.__name__ for t in patcher.types)}: its forward may differ "
                      f"(patchers match exact types)")
        else:
            reason = patcher.unsupported(module)
        if reason is None and wanted is not None and patcher.op not in wanted:
            reason = f"op {patcher.op} not in ops={sorted(wanted)}"
        if reason is None and "forward" in module.__dict__:
            reason = "forward already replaced on this instance (by another tool)"
        if reason:
            report.rows.append(PatchRow(path, kind, patcher.op, False, reason))
            continue
        _bind(module, patcher, backend)
        report.rows.append(PatchRow(path, kind, patcher.op, True, patcher.describe(module)))
        if patcher.per_call:
            report.per_call[kind] = patcher.per_call
    by_path = {r.module: r for r in report.rows}
    for index, path, module, patcher in via_rows:
        child = by_path.get(f"{path}.{patcher.via}" if path else patcher.via)
        if child is None:
            detail, patched = f"no .{patcher.via} a patcher serves", False
        else:
            detail, patched = f"via .{patcher.via}" + ("" if child.patched else f" (left alone: {child.detail})"), \
                child.patched
        report.rows[index] = PatchRow(path, type(module).__name__, patcher.op, patched, detail, new=False)
    return report


def unpatch(model: nn.Module) -> int:
    """Restore the stock forward of every module `patch` patched in `model`; returns how many."""
    restored = 0
    for module in model.modules():
        if patch_state(module) is not None:
            module.__dict__.pop("forward", None)
            del module.__dict__["_medattn_patch"]
            restored += 1
    return restored


# ---------------------------------------------------------------- nn.Conv2d (depthwise) -> depthwise_conv2d
MIN_KERNEL = 5  # below 5x5 PyTorch's own depthwise kernels are as fast: leave those convs alone


def _is_depthwise(conv: nn.Module) -> bool:
    return isinstance(conv, nn.modules.conv._ConvNd) and not getattr(conv, "transposed", False) and \
        conv.groups == conv.in_channels == conv.out_channels


def _depthwise_unsupported(conv: nn.Module) -> Optional[str]:
    from .ops.depthwise_conv2d import MAX_KERNEL
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__}: depthwise_conv2d is 2-D only"
    kh, kw = conv.kernel_size
    if tuple(conv.stride) != (1, 1):
        return f"stride {tuple(conv.stride)}: the op is stride 1"
    if conv.padding_mode != "zeros":
        return f"padding_mode {conv.padding_mode!r}: the op pads with zeros"
    if max(kh, kw) < MIN_KERNEL:
        return f"kernel {kh}x{kw} < {MIN_KERNEL}x{MIN_KERNEL}: PyTorch's own depthwise kernel is as fast"
    if max(kh, kw) > MAX_KERNEL:
        return f"kernel {kh}x{kw} > {MAX_KERNEL}"
    if conv.padding == "same" and (kh % 2 == 0 or kw % 2 == 0):
        return "padding='same' with an even kernel: PyTorch pads it asymmetrically"
    return None


def is_patchable_depthwise(conv: nn.Module) -> bool:
    """An nn.Conv2d the fused op computes exactly: groups == in == out channels, stride 1, zero padding
    mode, symmetric padding (an int pair, 'valid', or 'same' with an odd kernel), largest kernel side
    >= MIN_KERNEL and both sides <= 63."""
    return type(conv) is nn.Conv2d and _is_depthwise(conv) and _depthwise_unsupported(conv) is None


def _conv_padding(conv: nn.Conv2d) -> Tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))
    return tuple(conv.padding)


def _depthwise_forward(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4:
        return stock_forward(conv, "unbatched [C, H, W] input", x)
    from .ops.depthwise_conv2d import depthwise_conv2d
    count_fused(conv)
    return depthwise_conv2d(x, conv.weight, conv.bias, _conv_padding(conv), tuple(conv.dilation),
                            backend=op_backend(conv))


DEPTHWISE_CONV2D = register_patcher(Patcher(
    name="nn.Conv2d (depthwise)", op="depthwise_conv2d", types=(nn.Conv2d,), forward=_depthwise_forward,
    unsupported=_depthwise_unsupported, applies=_is_depthwise, per_call="the input is unbatched",
    describe=lambda conv: f"{conv.kernel_size[0]}x{conv.kernel_size[1]}, dilation {tuple(conv.dilation)}",
))

__all__ = ["patch", "unpatch", "PatchReport", "PatchRow", "Patcher", "PatchState", "register_patcher", "patchers",
           "patch_state", "stock_forward", "count_fused", "count_call", "op_backend", "fused_kernel_for", "is_patchable_depthwise",
           "FUSED"]
