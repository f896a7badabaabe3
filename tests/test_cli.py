"""`medattn` command line: info, and a tiny demo run end to end (2 steps, 32 px)."""
import importlib.util

import pytest

from medattn_kernels.cli import main


def test_info(capsys):
    assert main(["info"]) == 0
    assert "cross_attention" in capsys.readouterr().out


@pytest.mark.skipif(importlib.util.find_spec("nilearn") is None, reason="needs the nilearn wheel's data files")
def test_tiny_demo_writes_figures_and_table(tmp_path, capsys):
    assert main(["demo", "--steps", "2", "--size", "32", "--batch-size", "2", "--out", str(tmp_path),
                 "--no-isolated-memory"]) == 0
    out = capsys.readouterr().out
    for needle in ("Dice grey matter", "Dice white matter", "time per step", "kept for backward", "fused",
                   "reference"):
        assert needle in out
    assert (tmp_path / "predictions.png").stat().st_size > 0
    assert (tmp_path / "loss.png").stat().st_size > 0


def test_unknown_network_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="name: expected one of"):
        main(["demo", "--network", "unet3000", "--steps", "1", "--size", "32", "--out", str(tmp_path)])
