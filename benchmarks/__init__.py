"""fp8train's benchmarks (``python -m benchmarks SUITE`` from a source checkout); not installed
with the package."""
