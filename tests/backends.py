"""Which backends the tests can run on this machine (a helper module, not a test file)."""

from lion8bit import kernels

# The backends that take CPU tensors without Triton's interpreter; "triton" is tested through
# the interpreter in tests/test_triton_kernel.py.
CPU_BACKENDS = ["torch"] + [name for name in ("cpu",) if kernels.available(name)]
