"""Triton kernels and their launchers, one module per op. On a GPU they run compiled; on CPU tensors
they run under the interpreter when TRITON_INTERPRET=1 is set before triton is imported (how CI
checks them)."""
