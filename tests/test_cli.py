"""`medattn` command line: info, and a tiny demo run end to end (2 steps, 32 px)."""
import importlib.util
import os
import subprocess
import sys

import pytest
import torch

from medattn_kernels.cli import TIMING_WARMUP, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_info(capsys):
    assert main(["info"]) == 0
    assert "cross_attention" in capsys.readouterr().out


def test_info_into_a_closed_pipe_exits_without_a_traceback():
    """`medattn info | head -1`: the reader is gone before the output is flushed (here from the start,
    so the write always meets a closed pipe); the command stops with status 1 and nothing on stderr."""
    proc = subprocess.Popen([sys.executable, "-m", "medattn_kernels.cli", "info"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    proc.stdout.close()
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err.decode()
    assert err.decode() == ""


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="needs the nilearn wheel's data files")
@pytest.mark.parametrize("timing_rounds", [None, 0])
def test_tiny_demo_writes_figures_and_table(tmp_path, capsys, timing_rounds):
    extra = [] if timing_rounds is None else ["--timing-rounds", str(timing_rounds)]
    assert main(["demo", "--steps", "2", "--size", "32", "--batch-size", "2", "--out", str(tmp_path),
                 "--no-isolated-memory", *extra]) == 0
    out = capsys.readouterr().out
    for needle in ("Dice grey matter", "Dice white matter", "time per step", "kept for backward", "fused",
                   "reference"):
        assert needle in out
    # the table's step times: interleaved rounds after training by default, the training loop's median with 0
    assert (f"rounds after {TIMING_WARMUP} warm-up rounds" in out) == (timing_rounds is None)
    assert (tmp_path / "predictions.png").stat().st_size > 0
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_unknown_network_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="name: expected one of"):
        main(["demo", "--network", "unet3000", "--steps", "1", "--size", "32", "--out", str(tmp_path)])


class _KinkAtRounding(torch.nn.Module):
    """loss = sum(relu((x * w + 1e-8) - x) * c) + sum(c) (a loss far from 0): with w = 1 the ReLU's input
    is 0 in float32 (x + 1e-8 rounds to x for x near 1) and 1e-8 in float64, so every element crosses the
    kink; d loss / d w is sum(x * c) in float64 and (slope) sum(x * c) in float32."""

    def __init__(self, kind):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.c = torch.nn.Parameter(torch.rand(5) + 0.5)
        self.act = torch.nn.ReLU(inplace=True) if kind == "relu" else torch.nn.LeakyReLU(0.1, inplace=True)

    def training_loss(self, batch):
        x = batch["x"]
        return (self.act((x * self.w + 1e-8) - x) * self.c).sum() + self.c.sum(), None


class _KinkBeforeMaxPool(torch.nn.Module):
    """ReLU then a 2x2 max pool, each window [-1, -1, -1, z] with z = (x - (x * w + 1e-8)) + 5e-9: +5e-9 in
    float32 (x + 1e-8 rounds to x) and -5e-9 in float64. The float32 pool picks z (d loss / d w = -sum(x c)),
    the float64 one a ReLU zero (0): the oracle on float32's branches must also give z its positive sign."""

    def __init__(self, kind):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(()))
        self.c = torch.nn.Parameter(torch.rand(5) + 0.5)
        self.act = torch.nn.ReLU(inplace=True) if kind == "relu" else torch.nn.LeakyReLU(0.1, inplace=True)
        self.pool = torch.nn.MaxPool2d(2)

    def training_loss(self, batch):
        x = batch["x"]
        z = (x - (x * self.w + 1e-8)) + 5e-9
        windows = torch.cat([-torch.ones(5, 3, dtype=x.dtype), z[:, None]], 1).view(1, 5, 2, 2)
        return (self.pool(self.act(windows)).flatten() * self.c).sum() + self.c.sum(), None


@pytest.mark.parametrize("kind", ["relu", "leaky_relu"])
@pytest.mark.parametrize("model_class", [_KinkAtRounding, _KinkBeforeMaxPool])
def test_first_step_check_takes_each_variants_activation_branches(model_class, kind):
    import copy

    from medattn_kernels.cli import _first_step_check
    from medattn_kernels.testing import float64_batch, loss_and_gradients, rel_error

    model = model_class(kind)
    batch = {"x": 1 + torch.rand(5) * 0.5}
    _, rows = _first_step_check([("reference", model)], batch)
    e_loss, e_grad, crossings = rows["reference"]
    assert crossings == 5
    assert e_loss < 1e-6 and e_grad < 1e-6  # against the oracle on the float32 branches
    # the plain float64 oracle (its own branches) differs at O(1): what the crossings would have cost
    _, grads32, _ = loss_and_gradients(model, batch)
    _, grads64, _ = loss_and_gradients(copy.deepcopy(model).double(), float64_batch(batch))
    assert rel_error(grads32, grads64) > 0.05
    assert not model.act._forward_hooks and model.act.inplace  # the checks ran on copies


def test_a_kinked_module_called_twice_is_refused():
    from medattn_kernels.testing import loss_and_gradients

    class Twice(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.randn(4))
            self.act = torch.nn.ReLU()

        def training_loss(self, batch):
            return self.act(self.act(batch["x"] * self.w) - 0.5).sum(), None

    with pytest.raises(RuntimeError, match="act: a kinked activation module ran twice in one forward"):
        loss_and_gradients(Twice(), {"x": torch.randn(4)})


def test_negative_timing_rounds_are_rejected(tmp_path, capsys):
    assert main(["demo", "--timing-rounds", "-1", "--steps", "1", "--size", "32", "--out", str(tmp_path)]) == 2
    assert "--timing-rounds: expected >= 0" in capsys.readouterr().err
