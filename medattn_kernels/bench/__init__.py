"""Benchmarks: the harness (harness.py), one module of cases per op (<op>.py, each defining
`cases(device, dtype, quick) -> list[Case]`), and the CLI (cli.py, `python -m medattn_kernels.bench`)."""
import importlib
import pkgutil

# monai: network training steps with its own table (`--monai`), not op cases; it also needs monai.
_NOT_OPS = {"harness", "cli", "chart", "__main__", "monai"}


def op_modules() -> dict:
    """{op name: module} for every module here that defines `cases`."""
    found = {}
    for info in pkgutil.iter_modules(__path__):
        if info.name in _NOT_OPS:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        if hasattr(module, "cases"):
            found[info.name] = module
    return found
