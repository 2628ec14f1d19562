"""The tests/test_hf_* files' tiny transformers models (``benchmarks.hf``'s, built from
configs, no download) and their batches."""
import torch

from benchmarks.hf import TINY_ARCHS, TINY_ARCHS_EXTRA, TINY_VOCAB, tiny_config, tiny_model  # noqa: F401
from numerics import rel_err  # noqa: F401  (the HF tests import it from here)

ARCHS, ARCHS_EXTRA, VOCAB = TINY_ARCHS, TINY_ARCHS_EXTRA, TINY_VOCAB


def batch(seed: int = 0, batch_size: int = 2, seq_len: int = 32) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch_size, seq_len), generator=gen)


