"""Training-step code shared by `medattn demo`, the high-resolution benchmark and the DDP test.

Distributed: `init_distributed()` reads the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT); with WORLD_SIZE > 1 it joins the process group (gloo on CPU, nccl on CUDA)
and `Trainer` wraps the model in DistributedDataParallel. Each rank draws its own slice of every
global batch from one seeded generator, so a run is reproducible for a given world size. The same code
runs unchanged under `torchrun --nproc_per_node=N`.

Memory, per training step (forward + loss + backward):
* "kept for backward": `medattn_kernels.testing.saved_tensor_bytes` over the forward and the loss
  (design.md section 6), with the batch AND the parameters passed as inputs, so only activations count;
* "peak": on CUDA, torch.cuda.max_memory_allocated during the step minus the allocation before it;
  on CPU, the process's peak resident set during the step (Linux VmHWM, reset just before the step
  through /proc/self/clear_refs) minus the resident set just before it. tracemalloc does not see
  torch's allocations; getrusage's ru_maxrss cannot be reset and is inherited through fork + exec.
  `measure_step_isolated` runs the step in a fresh process, where the allocator holds nothing yet.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from .data.mri import MRISlices, flip_batch
from .models import SegmentationModel, build_model
from .testing import saved_tensor_bytes

# Defaults of the demo (tuned to reach mean GM/WM Dice >= 0.85 on held-out slices in a few minutes on
# 2 CPU cores; see docs/models.md).
DEFAULT_MODEL_KWARGS: Dict[str, dict] = {
    "din": dict(widths=(16, 24, 32, 48), stem_width=12, depth=1, heads=1),
    "joint-attention-dense-unet": dict(stem_width=16, growth=8, layers=3, levels=3),
    "mslkseg": dict(widths=(12, 16, 24, 32, 48), blocks=1),
    "ds2f": dict(widths=(16, 24, 32, 48)),
    "cross-modal-sad": dict(stem_width=12, widths=(16, 24, 32, 48)),
}


# ---------------------------------------------------------------- distributed
def distributed_env() -> tuple:
    """(rank, world_size, local_rank) from the torchrun environment; (0, 1, 0) without it."""
    return (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
            int(os.environ.get("LOCAL_RANK", 0)))


def init_distributed(device: str = "cpu") -> tuple:
    """Join the process group when WORLD_SIZE > 1 (no-op if already joined). Returns (rank, world)."""
    rank, world, local_rank = distributed_env()
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend, rank=rank, world_size=world)
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def unwrap(model: torch.nn.Module) -> SegmentationModel:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------- batches
def make_batch(data: MRISlices, index: torch.Tensor, device, flips: Optional[torch.Tensor] = None):
    """Batch dict on `device`; `flips` [B] bool mirrors those slices left-right (augmentation)."""
    image, enhanced, label = data.image[index], data.enhanced[index], data.label[index]
    if flips is not None:
        (image, enhanced), label = flip_batch((image, enhanced), label, flips)
    return {"image": image.to(device), "enhanced": enhanced.to(device), "label": label.to(device)}


def batch_indices(generator: torch.Generator, n: int, batch_size: int, rank: int = 0, world: int = 1):
    """This rank's share of one global batch (batch_size per rank) drawn from the shared generator."""
    idx = torch.randint(0, n, (batch_size * world,), generator=generator)
    return idx[rank * batch_size:(rank + 1) * batch_size]


def draw_batch(generator: torch.Generator, data: MRISlices, batch_size: int, device, rank: int = 0,
               world: int = 1) -> dict:
    """The next training batch of `fit`: slice indices and left-right flips drawn from `generator`."""
    index = batch_indices(generator, len(data), batch_size, rank, world)
    flips = torch.rand(batch_size * world, generator=generator)[rank * batch_size:(rank + 1) * batch_size] < 0.5
    return make_batch(data, index, device, flips=flips)


def cast_batch(batch: dict, dtype: torch.dtype) -> dict:
    return {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in batch.items()}


# ---------------------------------------------------------------- training
@dataclass
class Trainer:
    """Adam with a cosine decay to lr/20 over `steps`; one `step(batch)` = forward, loss, backward,
    (DDP all-reduce), update."""

    model: torch.nn.Module
    lr: float = 3e-3
    steps: int = 300
    weight_decay: float = 0.0
    history: List[float] = field(default_factory=list)

    def __post_init__(self):
        if dist.is_initialized() and not isinstance(self.model, torch.nn.parallel.DistributedDataParallel):
            self.model = torch.nn.parallel.DistributedDataParallel(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.optimizer, max(self.steps, 1),
                                                                   eta_min=self.lr / 20)

    def step(self, batch: dict) -> float:
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        outputs = self.model(*unwrap(self.model).inputs_of(batch))
        loss = unwrap(self.model).loss(outputs, batch["label"], **unwrap(self.model).loss_extras(batch))
        loss.backward()
        self.optimizer.step()
        self.schedule.step()
        value = float(loss.detach())
        self.history.append(value)
        return value


def fit(model: torch.nn.Module, data: MRISlices, steps: int, batch_size: int, lr: float = 3e-3, seed: int = 0,
        device="cpu", progress: bool = False, desc: str = "train") -> Trainer:
    """Train `model` for `steps` steps (the demo's, the DDP test's and torchrun's loop). Under a process
    group (init_distributed) the model is wrapped in DDP and each rank takes its slice of every global
    batch; every rank draws the same indices and flips from one generator seeded with `seed`, so two
    runs with the same seed (fused vs reference) see the same batches. `trainer.step_times` holds the
    wall time of every step (synchronised on CUDA)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    device = torch.device(device)
    trainer = Trainer(model, lr=lr, steps=steps)
    trainer.step_times = []
    gen = torch.Generator().manual_seed(seed)
    iterator = range(steps)
    bar = None
    if progress and rank == 0:
        from tqdm import tqdm
        bar = iterator = tqdm(iterator, desc=desc, unit="step", dynamic_ncols=True, file=sys.stdout)
    for _ in iterator:
        batch = draw_batch(gen, data, batch_size, device, rank, world)
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = trainer.step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        trainer.step_times.append(time.perf_counter() - start)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.4f}")
    if bar is not None:
        bar.close()
    return trainer


@torch.no_grad()
def predict(model: torch.nn.Module, data: MRISlices, device, batch_size: int = 8) -> torch.Tensor:
    """Label maps [N, H, W] (eval mode: BatchNorm running statistics)."""
    net = unwrap(model)
    was_training = net.training
    net.eval()
    preds = []
    for start in range(0, len(data), batch_size):
        batch = make_batch(data, torch.arange(start, min(start + batch_size, len(data))), device)
        preds.append(net(*net.inputs_of(batch))["logits"].argmax(1).cpu())
    net.train(was_training)
    return torch.cat(preds)


def dice_per_class(pred: torch.Tensor, target: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Dice of every class over all pixels of all slices: 2|P n T| / (|P| + |T|) (1 when both empty)."""
    out = torch.empty(num_classes, dtype=torch.float64)
    for c in range(num_classes):
        p, t = pred == c, target == c
        denom = p.sum() + t.sum()
        out[c] = 1.0 if denom == 0 else float(2 * (p & t).sum()) / float(denom)
    return out


# ---------------------------------------------------------------- per-step measurements
def rss_bytes() -> int:
    """Current resident set of this process (Linux /proc; falls back to ru_maxrss)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _status_kib(field_name: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """Peak resident set of this process's address space: VmHWM (Linux), which starts afresh at exec
    and can be reset (reset_peak_rss). getrusage's ru_maxrss is the fallback, but it is inherited
    through fork + exec, so a spawned child would report its parent's high-water mark."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current resident set (Linux >= 4.0: echo 5 > /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def kept_for_backward(model: torch.nn.Module, batch: dict) -> int:
    """Activation bytes autograd keeps for one training step (parameters and batch excluded)."""
    net = unwrap(model)
    params = list(net.parameters())

    def forward_and_loss(batch, _params):
        outputs = net(*net.inputs_of(batch))
        return net.loss(outputs, batch["label"], **net.loss_extras(batch))

    return saved_tensor_bytes(forward_and_loss, batch, params)


def time_and_peak(step: Callable[[], object], device) -> Tuple[float, int]:
    """Seconds of one call of `step` and its peak memory above the level before it (see the module
    docstring: CUDA allocations, or the CPU process's resident set)."""
    cuda = str(device).startswith("cuda")
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        reset_peak_rss()
        before = rss_bytes()
    start = time.perf_counter()
    step()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    peak = (torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()) - before
    return seconds, max(peak, 0)


def measure_step(trainer: Trainer, batch: dict, device) -> Dict[str, float]:
    """One training step's time, peak memory above the pre-step level (see the module docstring) and
    activations kept for backward (measured in a separate forward, not timed)."""
    seconds, peak = time_and_peak(lambda: trainer.step(batch), device)
    saved = kept_for_backward(trainer.model, batch)
    return {"step_s": seconds, "peak_bytes": peak, "saved_bytes": saved}


def use_threads(threads: int) -> None:
    """torch.set_num_threads(threads) only where it changes the count. ATen's set_num_threads also turns
    MKL's dynamic threading off (mkl_set_dynamic(false)), after which F.scaled_dot_product_attention's CPU
    kernel, which calls MKL's GEMM inside its own parallel loop, ran slower: gated self-attention
    B2 H4 N784 D64 fwd+bwd 20.2-20.7 ms against 18.8-19.1 ms without the call (Intel Xeon, 2 threads, 4
    processes each). A child process that set the count it already had timed the SDPA baselines slower than
    a user's process runs them."""
    if threads != torch.get_num_threads():
        torch.set_num_threads(threads)


def _isolated_step(queue, network: str, fused: bool, size: int, batch_size: int, device: str, model_kwargs: dict,
                   seed: int, threads: int):
    try:
        use_threads(threads)
        torch.manual_seed(seed)
        model = build_model(network, fused=fused, **model_kwargs).to(device)
        gen = torch.Generator().manual_seed(seed)
        batch = {"image": torch.rand(batch_size, 1, size, size, generator=gen),
                 "enhanced": torch.rand(batch_size, 1, size, size, generator=gen),
                 "label": torch.randint(0, 3, (batch_size, size, size), generator=gen)}
        batch = {k: v.to(device) for k, v in batch.items()}
        trainer = Trainer(model, steps=1)
        result = measure_step(trainer, batch, device)  # the step first, on a fresh allocator
        result["peak_total_bytes"] = peak_rss_bytes() if not device.startswith("cuda") else \
            torch.cuda.max_memory_allocated()
        result["ok"] = True
    except (RuntimeError, MemoryError) as exc:  # out of memory
        result = {"ok": False, "error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    queue.put(result)


def measure_step_isolated(network: str, fused: bool, size: int, batch_size: int, device: str = "cpu",
                          model_kwargs: Optional[dict] = None, seed: int = 0, cap_bytes: Optional[int] = None,
                          timeout_s: float = 1800.0, threads: Optional[int] = None) -> Dict[str, object]:
    """One training step of a freshly built network on random inputs, in its own spawned process.

    The step runs timed first, then its forward once more under saved_tensors_hooks (kept for backward:
    the peak RSS of that pass cannot exceed the full step's). Peak memory is
    the child's VmHWM (whole process: model, batch, Python and torch included: `peak_total_bytes`)
    and its rise over the pre-step resident set (`peak_bytes`). With ``cap_bytes``, the parent polls the
    child's resident set every 20 ms and kills it above the cap: the result is then ok=False,
    error="exceeded cap". A child that dies otherwise (the kernel's OOM killer) is reported the same way.
    """
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    kwargs = DEFAULT_MODEL_KWARGS.get(network, {}) if model_kwargs is None else model_kwargs
    proc = ctx.Process(target=_isolated_step, args=(queue, network, fused, size, batch_size, device, kwargs, seed,
                                                    threads or torch.get_num_threads()))
    proc.start()
    peak_seen, start, killed = 0, time.time(), None
    while proc.is_alive():
        try:
            with open(f"/proc/{proc.pid}/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            rss = 0
        peak_seen = max(peak_seen, rss)
        if cap_bytes is not None and rss > cap_bytes:
            killed = f"exceeded cap ({rss / 2**30:.1f} GiB > {cap_bytes / 2**30:.1f} GiB)"
        elif time.time() - start > timeout_s:
            killed = f"timeout after {timeout_s:.0f} s"
        if killed:
            proc.kill()
            break
        if not queue.empty():
            break
        time.sleep(0.02)
    result = None
    try:
        result = queue.get(timeout=5 if not killed else 0.5)
    except Exception:  # noqa: BLE001  (empty queue: the child died)
        pass
    proc.join(timeout=10)
    if proc.is_alive():
        proc.kill()
        proc.join()
    if result is None:
        result = {"ok": False, "error": killed or f"child exited with code {proc.exitcode} (out of memory?)"}
    result["rss_seen_bytes"] = peak_seen
    if cap_bytes is not None and result.get("ok") and result.get("peak_total_bytes", 0) > cap_bytes:
        result.update(ok=False, error="exceeded cap (peak resident set)")
    return result


def main(argv=None) -> int:
    """`python -m medattn_kernels.train` / `torchrun --nproc_per_node=N -m medattn_kernels.train`:
    trains a network on the MNI152 slices (DDP when WORLD_SIZE > 1) and prints the held-out Dice on rank 0."""
    import argparse

    from .data.mri import CLASS_NAMES, load_mni_splits

    p = argparse.ArgumentParser(prog="medattn-train", description=main.__doc__)
    p.add_argument("--network", default="din")
    p.add_argument("--size", type=int, default=96)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="per rank")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--reference", action="store_true", help="pure-PyTorch references instead of fused ops")
    args = p.parse_args(argv)
    rank, world = init_distributed(args.device)
    device = args.device
    if device.startswith("cuda") and world > 1:
        device = f"cuda:{distributed_env()[2]}"
    train, val = load_mni_splits(args.size)
    network = args.network.lower().replace("_", "-")
    torch.manual_seed(args.seed)  # identical initial weights on every rank (DDP also broadcasts rank 0's)
    model = build_model(network, fused=not args.reference, **DEFAULT_MODEL_KWARGS.get(network, {})).to(device)
    trainer = fit(model, train, args.steps, args.batch_size, args.lr, args.seed + 2, device, progress=True)
    if rank == 0:
        dice = dice_per_class(predict(model, val, device, args.batch_size), val.label, len(CLASS_NAMES))
        print("held-out Dice: " + ", ".join(f"{n} {d:.4f}" for n, d in zip(CLASS_NAMES, dice.tolist()))
              + f"; world size {world}; median step {statistics.median(trainer.step_times) * 1e3:.0f} ms")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
