"""C++ kernels for the CPU, compiled on first use and called from jitted steps through XLA's FFI."""
