"""Config heuristic of the dense sm_90a FP8 GEMM: pure Python, no CUDA calls, so CPU tests
can check that every choice it can make is legal (shared memory, registers, tile fit).

The first-order cost of a persistent GEMM is the number of waves (tiles / SMs, rounded up):
pick the tile shape that minimises it, then prefer the fullest last wave, then the larger
tile (fewer operand re-reads), then the deepest pipeline that fits in shared memory.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

SMEM_LIMIT = 232448           # bytes of dynamic shared memory an sm_90 block may use (227 KB)
MAX_STAGES = 12
MIN_STAGES = 3
BLOCK_K = 128
KINDS = ("1d2d", "1d1d")      # B scales 128x128 (fprop/dgrad, BF16 out) or 1x128 (wgrad, FP32 out)


@dataclass(frozen=True)
class GemmConfig:
    # Rows of the output tile: 64 (one math warpgroup), 128 (two) or 256 (two, walking the
    # tile in two waves of 128 rows; the contiguous m-grouped GEMM only over 256-row segments).
    block_m: int
    # Columns of the output tile: a multiple of 8 up to the register budget; it need not
    # divide 128 (tiles then straddle two 128x128 scale blocks of B).
    block_n: int
    # Depth of the TMA -> wgmma shared-memory pipeline.
    num_stages: int
    # CTAs launched (persistent grid): min(SMs, tiles).
    num_ctas: int
    # L2 rasterisation: column blocks per scheduler group.
    group_n: int
    # "1d2d" (B scales 128x128, BF16 out) or "1d1d" (B scales 1x128, FP32 out).
    kind: str = "1d2d"
    # CTAs per cluster: 2 shares an operand tile between two neighbouring tiles by TMA
    # multicast (half its traffic from L2); 1 otherwise.
    cluster: int = 1
    # Slices of K per output tile (1D2D, small M): each slice runs on its own CTA and the
    # last to finish adds the FP32 partials; 1 = no split.
    split_k: int = 1
    # What a cluster of two shares: "a" (two column blocks of one row block) or "b" (two row
    # blocks of one column block; dense only).
    shares: str = "a"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind: expected one of {KINDS}, got {self.kind!r}")
        if self.block_m not in (64, 128, 256):
            raise ValueError(f"block_m: expected 64, 128 or 256, got {self.block_m}")
        if self.block_m == 256 and self.split_k != 1:
            raise ValueError(f"block_m: 256-row tiles run without split-K, got split_k={self.split_k}")
        if self.block_n % 8 or not 8 <= self.block_n <= max_block_n(self.block_m) or not \
                block_n_is_legal(self.block_n, self.kind):
            raise ValueError(f"block_n: expected a multiple of 8 in [8, {max_block_n(self.block_m)}], "
                             f"got {self.block_n}")
        if not MIN_STAGES <= self.num_stages <= MAX_STAGES:
            raise ValueError(f"num_stages: expected {MIN_STAGES}..{MAX_STAGES}, got {self.num_stages}")
        if self.cluster not in (1, 2) or self.num_ctas % self.cluster:
            raise ValueError(f"cluster: expected 1 or 2 dividing num_ctas, got {self.cluster} "
                             f"with num_ctas={self.num_ctas}")
        if shared_bytes(self.block_m, self.block_n, self.num_stages, self.kind) > SMEM_LIMIT:
            raise ValueError(f"config needs more than {SMEM_LIMIT} bytes of shared memory: {self}")
        if self.split_k < 1 or (self.split_k > 1 and (self.kind != "1d2d" or self.cluster != 1)):
            raise ValueError(f"split_k: expected 1, or > 1 for a 1d2d kernel without clusters, got "
                             f"{self.split_k} ({self.kind}, cluster={self.cluster})")
        if self.shares not in ("a", "b") or (self.shares == "b" and (self.cluster != 2 or self.block_n % 16)):
            raise ValueError(f"shares: expected 'a', or 'b' with a cluster of two and block_n a "
                             f"multiple of 16, got {self.shares!r} (cluster={self.cluster}, "
                             f"block_n={self.block_n})")
        if self.num_ctas < 1 or self.group_n < 1:
            raise ValueError(f"num_ctas and group_n must be positive, got {self.num_ctas}, {self.group_n}")

    @property
    def num_threads(self) -> int:
        return (1 if self.block_m == 64 else 2) * 128 + 128


def max_block_n(block_m: int) -> int:
    """Largest BLOCK_N whose FP32 accumulators leave room for addressing and scales under
    setmaxnreg's 232 (two math warpgroups) or 248 (one): a partial and a promoted
    accumulator take BLOCK_N registers per thread; a 256-row tile's second wave adds
    BLOCK_N / 2 more."""
    return {64: 192, 128: 176, 256: 128}[block_m]


def block_n_is_legal(block_n: int, kind: str) -> bool:
    """1D2D tiles may straddle two 128x128 scale blocks of B, never three: a tile starts at
    most 128 - gcd(block_n, 128) into a block (mirrors the kernel's static_assert)."""
    gcd = min(block_n & -block_n, 128)
    return kind == "1d1d" or block_n <= 128 + gcd


def _slot(nbytes: int) -> int:
    return -(-nbytes // 128) * 128  # TMA writes shared memory at 128-byte aligned addresses


def shared_bytes(block_m: int, block_n: int, num_stages: int, kind: str) -> int:
    """What the kernel asks for; mirrors Sm90Fp8Gemm::kSharedBytes."""
    # A's 1x128 scales are read K-block-major (4 bytes a row per stage); B's (1D1D) as boxes
    # of 4 K blocks (16 bytes) per row.
    scale_b = _slot(16 * block_n) if kind == "1d1d" else 0
    staged = num_stages * (block_m * BLOCK_K + block_n * BLOCK_K + _slot(4 * block_m) + scale_b)
    out_tile = 0 if kind == "1d1d" else 2 * block_m * block_n
    return -(-staged // 1024) * 1024 + out_tile + 16 * num_stages + 1024


def deepest_stages(block_m: int, block_n: int, kind: str) -> int:
    """The most pipeline stages (up to MAX_STAGES) whose shared memory fits the limit."""
    stages = MAX_STAGES
    while shared_bytes(block_m, block_n, stages, kind) > SMEM_LIMIT:
        stages -= 1
    return stages


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


# Split-K for M <= 128 (always, for dense GEMMs): the GPU tests pass (bit-identical across
# launches) and on the H100 it is faster or equal on every small-M bench shape (e.g.
# 128x7168x16384 0.77 -> 0.95x cuBLAS, 128x4096x7168 1.00 -> 1.13x; docs/kernels.md).
# TMA multicast over a cluster of two is correct, sharing A or B, and at parity with no
# cluster at 128x128 tiles; at 256x128 it ran -12% to +2% (A) and -11% to +2% (B) on the H100
# (docs/kernels.md): the heuristic picks A's only when asked (`multicast=True`), B's only
# forced configs take, while the multicast loss is being found.
MIN_K_BLOCKS_PER_SPLIT = 4  # fewer and the pipeline never fills; the fixup dominates
MAX_SPLIT_BLOCK_N = 136  # wider split-K tiles spill in the reduction (BM 64, BN 192: 8 bytes)


# Narrow tiles for M <= 128: over 238 (BLOCK_M, BLOCK_N, split) configs on seven shapes with
# N <= 7168 (H100 sweep, docs/kernels.md), 64-wide tiles at their deepest pipeline (8-12
# stages) were the fastest on every shape, 11-41% ahead of the tiles the byte model below
# picks, once the tiles times the split fill at most one wave (a second, partial wave cost
# 10-30%). Their many small K-block loads keep more of B in flight than a few wide tiles
# do; the byte model only counts bytes.
NARROW_BLOCK_N = 64
MAX_NARROW_SPLIT = 4  # the most slices measured ahead (split 6-8 ran behind split 4)


def _narrow_choice(m: int, n: int, k: int, num_sms: int):
    """(block_m, block_n, split_k) with 64-wide tiles in one wave, or None where they need
    more than one wave (the byte model decides then). 64-row tiles while they fit in a wave
    (128x4096: 128 tiles of 64x64 ran 457 TFLOP/s, 64 of 128x64 432), else 128-row ones;
    the split fills the wave, keeping at least MIN_K_BLOCKS_PER_SPLIT K blocks a slice."""
    kb = k // BLOCK_K
    if n < NARROW_BLOCK_N:
        return None
    for bm in (64, 128) if m > 64 else (64,):
        tiles = ceil_div(m, bm) * ceil_div(n, NARROW_BLOCK_N)
        if tiles <= num_sms:
            split = 1
            while (split < MAX_NARROW_SPLIT and tiles * (split + 1) <= num_sms
                   and kb // (split + 1) >= MIN_K_BLOCKS_PER_SPLIT):
                split += 1
            return bm, NARROW_BLOCK_N, split
    return None


def takes_narrow_tiles(m: int, n: int, k: int, num_sms: int) -> bool:
    """Whether a dense 1D2D GEMM runs the 64-wide small-M tiles (``_narrow_choice``)."""
    return m <= 128 and _narrow_choice(m, n, k, num_sms) is not None


def _small_m_choice(m: int, n: int, k: int, num_sms: int, block_m: int):
    """(block_m, block_n, split_k) of a 1D2D GEMM with M <= 128: 64-wide tiles in one wave
    where they fit (_narrow_choice), else the tile and split that minimise the bytes the
    busiest SM pulls, waves x (A and B slices + the split's FP32 partials)."""
    narrow = _narrow_choice(m, n, k, num_sms)
    if narrow is not None:
        return narrow
    kind, kb = "1d2d", k // BLOCK_K
    best = None
    for block_n in range(16, max_block_n(block_m) + 1, 8):
        if (block_n > n and block_n != 16) or not block_n_is_legal(block_n, kind):
            continue
        for split in range(1, 9):
            if split > 1 and (kb // split < MIN_K_BLOCKS_PER_SPLIT or block_n > MAX_SPLIT_BLOCK_N):
                break
            tiles = ceil_div(m, block_m) * ceil_div(n, block_n) * split
            waves = ceil_div(tiles, num_sms)
            last_wave = tiles - (waves - 1) * num_sms
            per_tile = (block_m + block_n) * BLOCK_K * ceil_div(kb, split)
            if split > 1:  # write the partial, and the last slice reads the others back
                per_tile += block_m * block_n * 4 * 2
            key = (waves * per_tile, -last_wave, split, -block_n)
            if best is None or key < best[0]:
                best = (key, block_n, split)
    return block_m, best[1], best[2]


# TFLOP/s per full wave of 256x128 tiles over 128x128 ones: 1.06-1.25, median 1.14 over the
# eight dense 1D2D shapes with M >= 4096 and N >= 4096 of the H100 sweep (docs/kernels.md;
# the two N = 2112 shapes compared tiles of other widths): a K block's 48 KB of
# operands feed twice the MMAs of a 128-row tile's 32 KB.
TALL_TILE_SPEEDUP = 1.14


def relative_speed(block_m: int, block_n: int, kind: str) -> float:
    """Measured TFLOP/s of a tile per full wave relative to a 128x128 1D2D tile (1D1D: to
    the best 128-row BLOCK_N), for tiles that fill the GPU (H100; docs/kernels.md). 1D2D: N = 128
    runs ~15% faster than any tile that straddles 128x128 scale blocks or does not divide
    128 (96-160 measured, at 128 and 256 rows alike), and 64 loses to operand re-reads."""
    if kind == "1d1d":
        if block_m == 256:
            # 256x128 ran 0.95-1.10x per full wave of the best 128-row tile on seven wgrad
            # shapes (each B scale read from shared memory as the waves promote); narrower
            # 256-row tiles ran slower (96: 0.88-0.92x) and are never chosen.
            return 1.0
        return 0.85 + 0.15 * block_n / 176  # a linear fit: 128 measured 0.90, 152 0.94, 176 1.0
    if block_n == 128:
        speed = 1.0
    else:
        speed = 0.61 * block_n / 64 if block_n <= 64 else 0.85
    return speed * (TALL_TILE_SPEEDUP if block_m == 256 else 1.0)


# The k-grouped (MoE wgrad) GEMM: 256x128 tiles ran 1.05-1.09x the rate of the heuristic's
# 128x176 on three problems of 512-2048 tokens an expert (H100, docs/kernels.md), where the
# dense wgrad measured them at par per wave: each tile's K loop is a few blocks long, and a
# taller tile amortises its prologue and epilogue over twice the MMAs.
K_GROUPED_TALL_TILE_SPEEDUP = 1.07


def choose_config(m: int, n: int, k: int, num_sms: int, kind: str = "1d2d",
                  rows_per_group: int | None = None, grouped: bool = False, *,
                  split_k: bool = True, multicast: bool = False, segment_rows: int = 128) -> GemmConfig:
    """The config the native GEMM runs for this problem (cached per shape and options).

    grouped: a grouped (MoE) GEMM, which runs without clusters or split-K. The m-grouped
    contiguous GEMM (1d2d) takes 256-row tiles only when its expert segments are multiples
    of 256 rows (segment_rows = 256); the k-grouped one (1d1d: `m` is the experts' stacked
    output rows) and the masked one (rows_per_group) may always take them.
    split_k: let M <= 128 split K (dense only); multicast: let the heuristic pick clusters
    of two sharing A (dense only; off by default).
    rows_per_group: for grouped GEMMs whose tiles never span two experts (masked), the rows
    each expert has; `m` is the experts times rows_per_group. BLOCK_M then fits an expert
    (64 when it has <= 64 rows), and every expert's rows are tiled on their own.

    M <= 128 is bound by reading B: pick the tile that spreads N over the most SMs (fewest
    waves), or with split-K the (tile, slices) that pull the fewest bytes per SM. Larger M
    is bound by the tensor cores: minimise waves x tile time, tile time being the tile's
    area over the measured relative speed of its shape (256-row tiles: 1D2D at BLOCK_N <=
    128, 1D1D at 128).
    """
    if segment_rows not in (128, 256):
        raise ValueError(f"segment_rows: expected 128 or 256, got {segment_rows!r}")
    if rows_per_group is not None and (rows_per_group < 1 or m % rows_per_group):
        raise ValueError(f"rows_per_group: expected a positive divisor of m = experts x rows, "
                         f"got {rows_per_group} with m={m}")
    k_grouped = grouped and kind == "1d1d"
    grouped = grouped or rows_per_group is not None
    tall_tiles_on = not grouped or rows_per_group is not None or k_grouped or segment_rows == 256
    return _choose_config(m, n, k, num_sms, kind, rows_per_group, split_k and not grouped,
                          multicast and not grouped, tall_tiles_on, k_grouped)


def _row_blocks(m: int, block_m: int, rows_per_group: int | None) -> int:
    """Row blocks of the output: a masked GEMM tiles each expert's rows on their own."""
    if rows_per_group is None:
        return ceil_div(m, block_m)
    return m // rows_per_group * ceil_div(rows_per_group, block_m)


@functools.lru_cache(maxsize=4096)
def _choose_config(m: int, n: int, k: int, num_sms: int, kind: str, rows_per_group: int | None,
                   split_k_on: bool, multicast_on: bool, tall_tiles_on: bool,
                   k_grouped: bool) -> GemmConfig:
    """choose_config with the switches as arguments, so the cache never serves a config
    chosen under other settings."""
    if kind not in KINDS:
        raise ValueError(f"kind: expected one of {KINDS}, got {kind!r}")
    if min(m, n, k, num_sms) < 1 or k % BLOCK_K or n % 8:
        raise ValueError(f"expected m, n, k, num_sms >= 1, k % 128 == 0 and n % 8 == 0, "
                         f"got m={m}, n={n}, k={k}, num_sms={num_sms}")
    block_m = 64 if (m if rows_per_group is None else rows_per_group) <= 64 else 128
    split_k = 1
    if m <= 128 and split_k_on and kind == "1d2d":
        block_m, block_n, split_k = _small_m_choice(m, n, k, num_sms, block_m)
    else:
        best = None
        block_ms = (block_m, 256) if block_m == 128 and m > 128 and tall_tiles_on else (block_m,)
        for bm in block_ms:
            m_blocks = _row_blocks(m, bm, rows_per_group)
            for block_n in range(16, max_block_n(bm) + 1, 8):
                if (block_n > n and block_n != 16) or not block_n_is_legal(block_n, kind):
                    continue  # never a block wider than the problem
                if bm == 256 and kind == "1d1d" and block_n != 128:
                    continue  # the only 256-row wgrad tile that measured at par (relative_speed)
                tiles = m_blocks * ceil_div(n, block_n)
                waves = ceil_div(tiles, num_sms)
                last_wave = tiles - (waves - 1) * num_sms
                speed = relative_speed(bm, block_n, kind)
                if k_grouped and bm == 256:
                    speed *= K_GROUPED_TALL_TILE_SPEEDUP
                if m <= 128:
                    key = (waves, -last_wave, -block_n)
                else:
                    key = (waves * bm * block_n / speed, -block_n)
                if best is None or key < best[0]:
                    best = (key, bm, block_n)
        block_m, block_n = best[1], best[2]
    m_blocks = _row_blocks(m, block_m, rows_per_group)
    tiles = m_blocks * ceil_div(n, block_n) * split_k
    stages = deepest_stages(block_m, block_n, kind)
    # Multicast pays where operand traffic from L2 limits: many row blocks sharing A.
    cluster = 2 if multicast_on and m >= 512 and block_m >= 128 and tiles >= num_sms and split_k == 1 else 1
    num_ctas = min(num_sms, tiles if cluster == 1 else 2 * ceil_div(tiles, 2))
    num_ctas -= num_ctas % cluster
    group_n = raster_group_n(m_blocks, ceil_div(n, block_n), block_m, block_n, num_ctas, cluster)
    return GemmConfig(block_m=block_m, block_n=block_n, num_stages=stages, num_ctas=num_ctas,
                      group_n=group_n, kind=kind, cluster=cluster, split_k=split_k)


def raster_group_n(m_blocks: int, n_blocks: int, block_m: int, block_n: int, num_ctas: int,
                   cluster: int = 1, shares: str = "a") -> int:
    """Scheduler units per group (column blocks, or cluster tiles of two when a cluster
    shares A), a power of two, under which the tiles running at once read the fewest
    distinct operand rows.

    The walk (scheduler.cuh's Rasterizer) goes across a group's units, then down its row
    units, then on to the next group, so a wave of num_ctas tiles covers some whole groups
    and a band of the next. Each row block (block_m rows of A) and column block (block_n
    rows of B) it touches comes from DRAM about once per wave: minimise rows x block_m +
    columns x block_n; ties take the narrower group (a single row block: 1). At
    4096x4096x7168, 132 tiles of 256x128 in groups of 8 column blocks read 4096 + 1536 rows a
    wave where groups of 16 read 2304 + 2048: Nsight Compute measured 33% more DRAM bytes
    with the former, and the rate moved by 1-3% (docs/kernels.md). For grouped GEMMs, whose
    walk restarts per expert, this models the whole problem: a rough choice."""
    n_per_unit = cluster if shares == "a" else 1
    m_per_unit = cluster if shares == "b" else 1
    n_units, m_units = ceil_div(n_blocks, n_per_unit), ceil_div(m_blocks, m_per_unit)
    in_flight = max(1, num_ctas // cluster)  # scheduler units running at once
    best, width = None, 1
    while True:
        group_width = min(width, n_units)  # one group, narrower than asked, spans every column
        full_groups, rest = divmod(in_flight, group_width * m_units)
        rows = m_units if full_groups else ceil_div(rest, group_width)
        cols = min(full_groups * group_width + min(group_width, rest), n_units)
        rows_read = min(rows * m_per_unit, m_blocks) * block_m + min(cols * n_per_unit, n_blocks) * block_n
        if best is None or rows_read < best[0]:
            best = (rows_read, width)
        if width >= n_units:
            return best[1]
        width *= 2
