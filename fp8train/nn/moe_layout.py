"""Token permutation into the padded contiguous layout the grouped GEMMs read, and back.

Each (token, slot) assignment of the router's top-k goes to one row of a buffer sorted by
expert; each expert's segment starts on a multiple of ``align`` rows (128, or 256 for the
MoE layers' experts that average enough rows: ``segment_rows_for``), and rows no assignment
fills are zero. Everything is plain torch on the device with no host sync: the buffer has a
static row count, the upper bound ``floor((T*k + E*(align-1)) / align) * align``; the rows
past the experts' segments are spare zero rows that belong to no expert (the grouped GEMMs
write them as zeros without math, and the weight gradients leave them out).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import check_tensor

ALIGN = 128
# Experts averaging this many rows get 256-row segments: the contiguous grouped GEMM then
# takes 256-row tiles, which ran it 6-19% faster at 512-2048 rows an expert (H100,
# docs/kernels.md), while the padding grows by ~64 rows an expert on average (6% at 1024).
TALL_SEGMENT_MIN_ROWS = 1024


def segment_rows_for(num_assignments: int, num_experts: int) -> int:
    """The segment alignment the MoE layers lay their experts out with: 256 where the
    ``num_assignments`` (tokens x top-k) average at least ``TALL_SEGMENT_MIN_ROWS`` an expert,
    else 128. Sizes only, so it never reads a count back from the device."""
    return 2 * ALIGN if num_assignments >= TALL_SEGMENT_MIN_ROWS * num_experts else ALIGN


@dataclass(frozen=True)
class MoELayout:
    """Where every assignment lives in the padded contiguous layout.

    group_offsets: int32 ``[E+1]``: expert e owns rows ``[offsets[e], offsets[e+1])``; all
        multiples of ``align``; rows from ``offsets[E]`` (at most ``num_rows``) to ``num_rows`` are
        spare (zero rows of no expert).
    dest_rows: int64 ``[T*k]``: padded row of assignment ``t*k + j`` (token t, slot j).
    src_tokens: int64 ``[num_rows]``: token each padded row copies; ``T`` (a zero row) for
        padding rows.
    tokens_per_expert: int64 ``[E]``: assignments per expert (before padding).
    align: the rows every segment is a multiple of (the grouped GEMMs' ``segment_rows``).
    """

    group_offsets: torch.Tensor
    dest_rows: torch.Tensor
    src_tokens: torch.Tensor
    tokens_per_expert: torch.Tensor
    num_tokens: int
    top_k: int
    align: int = ALIGN

    @property
    def num_rows(self) -> int:
        return self.src_tokens.shape[0]


def padded_rows_bound(num_assignments: int, num_experts: int, align: int = ALIGN) -> int:
    """Rows of the padded layout: an upper bound of sum_e ceil(count_e / align) * align
    that depends on the sizes only (so no count is read back to the host)."""
    return (num_assignments + num_experts * (align - 1)) // align * align


def build_moe_layout(topk_ids: torch.Tensor, num_experts: int, align: int = ALIGN) -> MoELayout:
    """Layout for router choices ``topk_ids`` (int ``[T, k]``, values in ``[0, E)``)."""
    check_tensor("topk_ids", topk_ids, dtypes=(torch.int64, torch.int32), ndims=(2,))
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
        raise ValueError(f"num_experts: expected a positive int, got {num_experts!r}")
    if isinstance(align, bool) or not isinstance(align, int) or align < 1 or align % ALIGN:
        raise ValueError(f"align: expected a positive multiple of {ALIGN}, got {align!r}")
    num_tokens, top_k = topk_ids.shape
    device = topk_ids.device
    expert_of = topk_ids.reshape(-1).long()                               # [T*k]
    _check_expert_ids(expert_of, num_experts)
    # scatter_add, not bincount: its output size never depends on the data (compilable).
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device).scatter_add_(
        0, expert_of, torch.ones_like(expert_of))                         # [E]
    padded = (counts + align - 1) // align * align
    num_rows = padded_rows_bound(expert_of.numel(), num_experts, align)

    padded_starts = torch.cumsum(padded, 0) - padded                      # [E]
    starts = torch.cumsum(counts, 0) - counts                             # [E]
    # A stable sort by expert keeps token order inside each segment (deterministic).
    sorted_expert, order = torch.sort(expert_of, stable=True)
    rank = torch.arange(expert_of.numel(), device=device) - starts[sorted_expert]
    dest_rows = torch.empty_like(order)
    dest_rows[order] = padded_starts[sorted_expert] + rank

    src_tokens = torch.full((num_rows,), num_tokens, dtype=torch.int64, device=device)
    src_tokens[dest_rows] = torch.arange(expert_of.numel(), device=device) // top_k

    # The last offset is where the experts' rows end, not the buffer's static end: the
    # grouped GEMMs give the spare rows past it no math. (A leading zero padded on: writing a
    # Python 0 into a CUDA tensor is a host-to-device copy that waits for the GPU.)
    group_offsets = torch.nn.functional.pad(torch.cumsum(padded, 0).to(torch.int32), (1, 0))
    return MoELayout(group_offsets, dest_rows, src_tokens, counts, num_tokens, top_k, align)


def _check_expert_ids(expert_of: torch.Tensor, num_experts: int) -> None:
    """Every id in [0, E): checked on the host for CPU tensors; on a GPU (where reading the
    values back would stall every step) an asynchronous device assert that names the
    argument fires before an id is used as an index."""
    if expert_of.numel() == 0:
        return
    if expert_of.device.type == "cpu" and not torch.compiler.is_compiling():
        lo, hi = int(expert_of.min()), int(expert_of.max())
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"topk_ids: expected expert ids in [0, {num_experts}), got values "
                             f"from {lo} to {hi}")
        return
    torch._assert_async(((expert_of >= 0) & (expert_of < num_experts)).all(),
                        f"topk_ids: expert ids outside [0, {num_experts})")


def permute(x: torch.Tensor, layout: MoELayout) -> torch.Tensor:
    """x ``[T, H]`` -> ``[num_rows, H]`` in the padded layout (padding rows zero).

    A gather from x with one zero row appended: its backward sums the k copies of each
    token, which is exactly dL/dx.
    """
    check_tensor("x", x, ndims=(2,))
    if x.shape[0] != layout.num_tokens:
        raise ValueError(f"x: expected {layout.num_tokens} rows (tokens), got {x.shape[0]}")
    return gather_rows(x, layout.src_tokens)


def gather_rows(x: torch.Tensor, src_tokens: torch.Tensor) -> torch.Tensor:
    """Rows ``x[src_tokens[r]]`` of x ``[T, K]``, zero where ``src_tokens[r] == T`` (no checks:
    ``permute`` checks, and the FP8 layers fuse this gather into their casts)."""
    x_ext = torch.cat([x, x.new_zeros(1, x.shape[1])])
    return x_ext[src_tokens]


def scatter_add_rows(grad_rows: torch.Tensor, src_tokens: torch.Tensor,
                     num_tokens: int) -> torch.Tensor:
    """The gradient of ``gather_rows``: ``[num_tokens, K]``, each token the sum of its rows'
    gradients. The same ``index_put_`` accumulation autograd runs for the gather's backward,
    so a layer that fuses the gather gives the same bits as ``permute`` followed by it."""
    grad = grad_rows.new_zeros(num_tokens + 1, grad_rows.shape[1])
    return grad.index_put_((src_tokens,), grad_rows, accumulate=True)[:num_tokens]


def unpermute(y: torch.Tensor, layout: MoELayout, topk_weights: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_j topk_weights[t, j] * y[dest_rows[t*k + j]]`` -> ``[T, H]`` of y's dtype.

    The weighted sum runs in FP32 (the router's weights are FP32) and rounds once.
    """
    check_tensor("y", y, ndims=(2,))
    check_tensor("topk_weights", topk_weights, ndims=(2,))
    if tuple(topk_weights.shape) != (layout.num_tokens, layout.top_k):
        raise ValueError(f"topk_weights: expected shape {(layout.num_tokens, layout.top_k)}, "
                         f"got {tuple(topk_weights.shape)}")
    return _WeightedCombine.apply(y, layout.dest_rows, topk_weights)


def _combine_terms(y: torch.Tensor, dest_rows: torch.Tensor, topk_weights: torch.Tensor):
    """The FP32 rows ``[T, k, H]`` of every assignment and the FP32 weights ``[T, k, 1]``."""
    num_tokens, top_k = topk_weights.shape
    rows = y[dest_rows].view(num_tokens, top_k, y.shape[1]).float()
    return rows, topk_weights.float().unsqueeze(-1)


class _WeightedCombine(torch.autograd.Function):
    """``unpermute``'s sum with the gradients autograd would give it, op for op (so the same
    bits), but keeping y itself for backward rather than the FP32 copy of its gathered rows
    that autograd's multiply would keep (k FP32 rows a token against the padded BF16
    rows): backward gathers and widens them again."""

    @staticmethod
    def forward(ctx, y, dest_rows, topk_weights):
        rows, weights = _combine_terms(y, dest_rows, topk_weights)
        ctx.save_for_backward(y, dest_rows, topk_weights)
        return (rows * weights).sum(1).to(y.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        y, dest_rows, topk_weights = ctx.saved_tensors
        rows, weights = _combine_terms(y, dest_rows, topk_weights)
        grad = grad_out.float().unsqueeze(1).expand_as(rows)
        grad_y = grad_weights = None
        if ctx.needs_input_grad[0]:
            grad_rows = (grad * weights).to(y.dtype).view(-1, y.shape[1])
            grad_y = y.new_zeros(y.shape).index_put_((dest_rows,), grad_rows, accumulate=True)
        if ctx.needs_input_grad[2]:
            grad_weights = (grad * rows).sum(-1).to(topk_weights.dtype)
        return grad_y, None, grad_weights
