"""Training losses of a converted tiny transformers model, eager against compiled layers.

    python scripts/compiled_vs_eager_steps.py [--arch qwen3_moe] [--device cpu|cuda] [--steps 12]

Same init, same batch, AdamW; prints the loss of every step for BF16 and FP8, each eager and
with every decoder layer compiled (Inductor). Compiled and eager FP8 should track each other
as closely as compiled and eager BF16 do; a gap that grows step by step points at a fault in
a compiled FP8 path (on the GPU: the native kernels under Inductor). BF16 autocast on the GPU
(as ``bench hf`` trains), FP32 on the CPU.
"""
import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import fp8train  # noqa: E402
from hf_models import ARCHS, batch, tiny_model  # noqa: E402


def train(base, ids, *, fp8: bool, compiled: bool, steps: int, device: str) -> list:
    model = copy.deepcopy(base)
    if fp8:
        fp8train.convert_to_fp8(model)
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    torch._dynamo.reset()
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen3_moe", choices=sorted(ARCHS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")
    base = tiny_model(args.arch, seed=0).to(args.device)
    ids = batch(0, batch_size=4, seq_len=64).to(args.device)
    rows = {}
    for fp8 in (False, True):
        for compiled in (False, True):
            name = f"{'fp8' if fp8 else 'bf16'} {'compiled' if compiled else 'eager'}"
            rows[name] = train(base, ids, fp8=fp8, compiled=compiled, steps=args.steps,
                               device=args.device)
            print(f"{name:<14}", " ".join(f"{v:.4f}" for v in rows[name]), flush=True)
    for precision in ("bf16", "fp8"):
        eager, compiled = rows[f"{precision} eager"], rows[f"{precision} compiled"]
        print(f"{precision}: compiled / eager - 1 at the last step: {compiled[-1] / eager[-1] - 1:+.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
