"""DistributedDataParallel on CPU: 2 processes (gloo, a free localhost port) train DIN for a few steps
through medattn_kernels.train.fit (the demo's loop), with the torchrun environment variables, and their
parameters stay identical while their batches differ."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as tmp

WORLD = 2
SIZE = 32


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _synthetic_slices(n=6, size=SIZE):
    from medattn_kernels.data.mri import MRISlices

    g = torch.Generator().manual_seed(123)
    image = torch.rand(n, 1, size, size, generator=g)
    return MRISlices(image, image.sqrt(), torch.randint(0, 3, (n, size, size), generator=g), torch.arange(n))


def _worker(rank, port, steps, results):
    # The torchrun environment: init_distributed() reads exactly these.
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from medattn_kernels.models import build_model
    from medattn_kernels.train import fit, init_distributed

    got_rank, world = init_distributed("cpu")
    assert (got_rank, world) == (rank, WORLD)
    torch.manual_seed(rank)  # deliberately different initial weights: DDP must broadcast rank 0's
    model = build_model("din", fused=True, widths=(8, 8, 12, 16), stem_width=8, depth=1, heads=1)
    initial = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    seen = []
    import medattn_kernels.train as train_mod

    make_batch = train_mod.make_batch

    def recording_make_batch(data, index, device, flips=None):
        seen.append(index.clone())
        return make_batch(data, index, device, flips)

    train_mod.make_batch = recording_make_batch
    try:
        trainer = fit(model, _synthetic_slices(), steps, batch_size=2, lr=1e-2, seed=7)
    finally:
        train_mod.make_batch = make_batch
    params = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(params) for _ in range(WORLD)]
    dist.all_gather(gathered, params)
    initial0 = initial.clone()
    dist.broadcast(initial0, 0)
    results[rank] = {
        "max_param_diff": max((g - params).abs().max().item() for g in gathered),
        "moved": (params - initial0).abs().max().item(),
        "indices": torch.stack(seen),
        "losses": trainer.history,
        "ddp": type(trainer.model).__name__,
    }
    dist.destroy_process_group()


@pytest.mark.slow
def test_two_process_ddp_keeps_replicas_identical():
    steps = 3
    with tmp.Manager() as manager:
        results = manager.dict()
        tmp.spawn(_worker, args=(_free_port(), steps, results), nprocs=WORLD, join=True)
        results = dict(results)
    assert sorted(results) == list(range(WORLD))
    for rank, res in results.items():
        assert res["ddp"] == "DistributedDataParallel"
        assert res["max_param_diff"] == 0.0, f"rank {rank}: replicas diverged by {res['max_param_diff']}"
        assert res["moved"] > 0, "training changed the parameters"
        assert len(res["losses"]) == steps and all(torch.isfinite(torch.tensor(res["losses"])))
    # each rank trained on its own slice of the global batches
    assert not torch.equal(results[0]["indices"], results[1]["indices"])
