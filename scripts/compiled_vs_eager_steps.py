"""Training of a converted transformers model, eager against compiled decoder layers.

    python scripts/compiled_vs_eager_steps.py [--model tiny-qwen3_moe|qwen3-moe-1b|llama-1b]
        [--layers N] [--batch B] [--seq-len S] [--steps 12] [--device cpu|cuda]

Same init, same batch, AdamW. First the gradients of one step, compiled against eager, for
BF16 and for FP8 (the worst parameters by relative error): compiled and eager FP8 should
differ about as much as compiled and eager BF16 do (a few e4m3 rounding flips), a wrong
kernel or layout under Inductor gives O(1) somewhere. Then the loss of every step for the
four runs. ``tiny-ARCH`` are the tests' 2-layer models; the 1B models are ``bench hf``'s,
built as it builds them (GPU only; ``--layers`` cuts them). BF16 autocast on the GPU (as
``bench hf`` trains), FP32 on the CPU.
"""
import argparse
import copy
import sys
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/

import fp8train  # noqa: E402
from benchmarks import hf as bench_hf  # noqa: E402
from benchmarks.hf import MODELS  # noqa: E402
from benchmarks.gemm import rel_err  # noqa: E402
from benchmarks.hf import TINY_ARCHS as ARCHS, TINY_VOCAB as VOCAB, tiny_model  # noqa: E402


def build(name: str, layers, device: str, seq_len: int):
    """The base model (FP32 master weights) and its vocabulary size: a tiny test model, or
    the 1B model exactly as ``bench hf`` builds it (on the GPU, with its BF16 experts)."""
    if name.startswith("tiny-"):
        return tiny_model(name[len("tiny-"):], seed=0).to(device), VOCAB
    if device != "cuda":
        raise SystemExit(f"--model {name}: bench hf's models run on the GPU only")
    spec = dict(MODELS[name])
    if layers is not None:
        spec["num_hidden_layers"] = layers
    return bench_hf._build(spec, seq_len, seed=0), spec["vocab_size"]


def prepare(base, *, fp8: bool, compiled: bool):
    model = copy.deepcopy(base)
    if fp8:
        fp8train.convert_to_fp8(model)
    if compiled:
        for layer in model.model.layers:
            layer.compile()
    return model


def loss_of(model, ids, device: str):
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        # use_cache=False: a KV cache update per layer_idx would recompile every layer.
        return model(input_ids=ids, labels=ids, use_cache=False).loss


def first_grads(base, ids, *, fp8: bool, compiled: bool, device: str) -> dict:
    model = prepare(base, fp8=fp8, compiled=compiled)
    loss_of(model, ids, device).backward()
    grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    del model
    torch._dynamo.reset()
    return grads


def train(base, ids, *, fp8: bool, compiled: bool, steps: int, lr: float, device: str) -> list:
    model = prepare(base, fp8=fp8, compiled=compiled)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    losses = []
    for _ in range(steps):
        loss = loss_of(model, ids, device)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    del model, optimizer
    torch._dynamo.reset()
    return losses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    choices = [f"tiny-{a}" for a in sorted(ARCHS)] + sorted(MODELS)
    parser.add_argument("--model", default="tiny-qwen3_moe", choices=choices)
    parser.add_argument("--arch", help="old spelling of --model tiny-ARCH", choices=sorted(ARCHS))
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (1B models)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=None, help="default 64 (tiny), 2048 (1B)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate; default 3e-3 (tiny), 1e-4 (1B, as bench hf)")
    args = parser.parse_args()
    if args.arch:
        args.model = f"tiny-{args.arch}"
    if args.steps < 1:
        parser.error(f"--steps must be >= 1, got {args.steps}")
    tiny = args.model.startswith("tiny-")
    if args.layers is not None and (args.layers < 1 or tiny):
        parser.error(f"--layers takes a positive count for the 1B models, got {args.layers} "
                     f"with --model {args.model}")
    lr = args.lr if args.lr is not None else (3e-3 if tiny else 1e-4)
    warnings.filterwarnings("ignore", message="fp8train: .* runs on the reference")
    seq_len = args.seq_len or (64 if tiny else 2048)
    base, vocab = build(args.model, args.layers, args.device, seq_len)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (args.batch, seq_len), generator=gen).to(args.device)
    print(f"{args.model}: {sum(p.numel() for p in base.parameters()) / 1e6:.1f}M parameters, "
          f"{args.batch}x{seq_len} tokens, {args.device}", flush=True)

    for fp8 in (False, True):
        precision = "fp8" if fp8 else "bf16"
        eager = first_grads(base, ids, fp8=fp8, compiled=False, device=args.device)
        compiled = first_grads(base, ids, fp8=fp8, compiled=True, device=args.device)
        missing = sorted(set(eager) ^ set(compiled))
        if missing:
            print(f"{precision}: gradients only one of the runs has: {missing[:5]}")
        errs = sorted(((rel_err(compiled[n], eager[n]), n) for n in eager if n in compiled),
                      reverse=True)
        print(f"{precision} first-step gradients, compiled vs eager: median "
              f"{errs[len(errs) // 2][0]:.2e}, worst:", flush=True)
        for err, name in errs[:6]:
            print(f"  {err:.2e}  {name}")
        del eager, compiled

    rows = {}
    for fp8 in (False, True):
        for compiled in (False, True):
            name = f"{'fp8' if fp8 else 'bf16'} {'compiled' if compiled else 'eager'}"
            rows[name] = train(base, ids, fp8=fp8, compiled=compiled, steps=args.steps, lr=lr,
                               device=args.device)
            print(f"{name:<14}", " ".join(f"{v:.4f}" for v in rows[name]), flush=True)
    for precision in ("bf16", "fp8"):
        eager, compiled = rows[f"{precision} eager"], rows[f"{precision} compiled"]
        print(f"{precision}: compiled / eager - 1 at the last step: {compiled[-1] / eager[-1] - 1:+.3%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
