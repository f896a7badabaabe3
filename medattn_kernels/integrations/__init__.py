"""Patchers for other libraries' modules (see medattn_kernels/patch.py). Each submodule imports its library
and registers its patchers at import; `medattn_kernels.patch` imports a submodule only once its library has
been imported by the user (a model cannot hold that library's modules otherwise)."""
