"""Error measures shared by the tests."""
import torch


def rel_err(x: torch.Tensor, y: torch.Tensor) -> float:
    """||x - y|| / ||y|| in float64."""
    x, y = x.double(), y.double()
    return ((x - y).norm() / y.norm().clamp_min(1e-30)).item()
