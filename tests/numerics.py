"""Error measures and inputs shared by the tests."""
import torch


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def rel_err_of_output(x: torch.Tensor, ref: torch.Tensor) -> float:
    """rel_err for GEMM outputs on the GPU: a reference below 1e-30 in norm (tiny inputs whose
    BF16 products are subnormal) counts as zero, so only the absolute error is judged."""
    x, ref = x.double(), ref.double()
    return ((x - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def rand(*shape, seed: int, scale: float = 1.0, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Seeded Gaussian CPU tensor (the same values for a seed whatever else ran)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(*shape, generator=gen) * scale).to(dtype)
