"""pytest-benchmark view of the MONAI cases (quick sizes): a training step of each network, stock and patched
(and MONAI's use_flash_attention for the attention U-Net), and the SpatialAttentionBlock cases.
`pytest benchmarks/bench_monai.py`; the table with memory and ratios: `medattn bench --monai`."""
import pytest
import torch

pytest.importorskip("monai", reason="needs monai (the [monai] extra)")

from medattn_kernels.bench import monai as cases_module  # noqa: E402
from benchmarks._params import case_params, run_benchmark  # noqa: E402

NETWORK_PARAMS = [pytest.param(spec, variant, id=f"{spec.label}-{variant}")
                  for spec in cases_module.network_specs(quick=True)
                  for variant in (("stock", "flash", "patched") if spec.name == "AttentionUNet" else ("stock", "patched"))]


@pytest.mark.parametrize("spec, variant", NETWORK_PARAMS)
def test_bench_training_step(benchmark, spec, variant):
    model = cases_module.build_variants(spec, ("stock", variant) if variant != "stock" else ("stock",))[variant]
    batch = spec.batch(torch.Generator().manual_seed(1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    benchmark.extra_info.update(network=spec.label, variant=variant,
                                kept_mib=cases_module.kept_for_backward(spec, model, batch) / 2**20)
    benchmark.pedantic(lambda: cases_module.training_step(spec, model, optimizer, batch), warmup_rounds=1,
                       rounds=3, iterations=1)


@pytest.mark.parametrize("case, candidate, mode", case_params(cases_module))
def test_bench_spatial_attention_block(benchmark, case, candidate, mode):
    run_benchmark(benchmark, case, candidate, mode)
