from fp8train import ops
from benchmarks.grouped import run_case, zipf_rows, SHAPES
for g, r, n, k in SHAPES[2:4]:
    row = run_case(f"zipf {g} {n},{k}", zipf_rows(g, g * r), n, k)
    print({k2: (round(v) if isinstance(v, float) and v > 1 else v) for k2, v in row.items()}, flush=True)
