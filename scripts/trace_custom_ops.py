"""Where a compiled FP8 model first departs from eager: every fp8train custom op's operands
and results, logged in both runs and compared call by call.

    python scripts/trace_custom_ops.py [--arch qwen3_moe] [--backends aot_eager,inductor,dump]
        [--recipe NAME] [--no-autocast] ...

One decoder layer of the tests' tiny transformers model, converted to FP8, forward and
backward under BF16 autocast (as ``bench hf`` trains), eager and then under each
``torch.compile`` backend. The functions the custom ops call (casts, GEMMs) are wrapped at
run time, so the log shows what the kernels really received: shape, strides, offset,
16-byte alignment, and a checksum of the values. Printed: the gradients of each backend
against eager, and the op calls whose operands or results differ. Backend ``dump`` is
aot_eager writing AOTAutograd's forward and backward graphs to ``--dump-graphs``.

It found why a traced FP8GroupedLinearFunction under CUDA autocast got all-zero output
gradients on the H100 (torch 2.11): its forward returned the GEMM op's output tensor itself;
returning a new tensor of its own (as the dense Function does) traces right.
"""
import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/

import fp8train  # noqa: E402
from fp8train.nn import _custom_ops  # noqa: E402
from benchmarks.gemm import rel_err  # noqa: E402
from benchmarks.hf import TINY_ARCHS as ARCHS, tiny_model  # noqa: E402

LOG: list = []
AUTOCAST = True  # BF16 autocast, as bench hf and the recipes train (--no-autocast: FP32)


def describe(t):
    """(layout string, checksum) of a tensor; (repr, None) of anything else."""
    if not isinstance(t, torch.Tensor):
        plain = isinstance(t, (bool, int, float, str, type(None)))
        return (repr(t) if plain else type(t).__name__), None
    values = t.detach()
    if values.dtype == torch.float8_e4m3fn:
        values = values.float()
    values = values.double()
    checksum = (values.abs() if t.is_floating_point() else values).sum().item()
    return (f"{tuple(t.shape)} {str(t.dtype).removeprefix('torch.')} stride={t.stride()} "
            f"off={t.storage_offset()} al16={t.data_ptr() % 16 == 0}"), checksum


def differs(a, b, tol: float) -> bool:
    (la, ca), (lb, cb) = a, b
    if la != lb or (ca is None) != (cb is None):
        return True
    if ca is None:
        return False
    if ca != ca or cb != cb:  # NaN
        return (ca != ca) != (cb != cb)
    return abs(ca - cb) > tol * max(abs(ca), abs(cb), 1e-30)


def flatten(value):
    if isinstance(value, (tuple, list)):
        return [x for v in value for x in flatten(v)]
    return [value]


def wrap(module, name: str) -> None:
    fn = getattr(module, name)

    @functools.wraps(fn)
    def logged(*args, **kwargs):
        inputs = [describe(a) for a in flatten(list(args) + list(kwargs.values()))]
        out = fn(*args, **kwargs)
        LOG.append((name, inputs, [describe(o) for o in flatten(out)]))
        return out

    setattr(module, name, logged)


def run_layer(layer, fn, x, pos, position_ids, device):
    """``fn`` (the layer, or a compiled wrapper of it) forward and backward; ``layer``'s
    gradients."""
    LOG.clear()
    x = x.detach().clone().requires_grad_(True)
    layer.zero_grad(set_to_none=True)
    with torch.autocast(device, dtype=torch.bfloat16, enabled=AUTOCAST):
        y = fn(x, position_embeddings=pos, position_ids=position_ids)
    y = y[0] if isinstance(y, tuple) else y
    y.float().square().mean().backward()
    grads = {n: p.grad.detach().float().clone() for n, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = x.grad.detach().float().clone()
    return y.detach().float(), grads, list(LOG)


def dumping_backend(directory: str):
    """aot_eager that writes every forward and backward graph AOTAutograd hands it to
    ``directory`` (readable FX code with shapes and dtypes)."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    Path(directory).mkdir(parents=True, exist_ok=True)
    counter = [0]

    def writer(kind):
        def compiler(gm, example_inputs):
            counter[0] += 1
            path = Path(directory) / f"{counter[0]:02d}_{kind}.py"
            path.write_text(gm.print_readable(print_output=False, include_stride=True, include_device=True))
            print(f"   wrote {path}")
            return make_boxed_func(gm.forward)
        return compiler

    return aot_autograd(fw_compiler=writer("forward"), bw_compiler=writer("backward"))


def group(log) -> dict:
    """(op, operand shapes) -> [(call index, call)] in call order."""
    groups: dict = {}
    for i, call in enumerate(log):
        shapes = tuple(layout.split(" stride=")[0] for layout, _ in call[1])
        groups.setdefault((call[0], shapes), []).append((i, call))
    return groups


def pair_calls(ref_calls, calls):
    """Each eager call with the compiled call of the same op and shapes whose operand
    checksums are closest (Inductor reorders independent calls, and rounds a little
    differently, so neither order nor exact sums identify a call)."""
    def distance(a, b):
        total = 0.0
        for (_, ca), (_, cb) in zip(a[1], b[1]):
            if ca is not None and cb is not None and ca == ca and cb == cb:
                total += abs(ca - cb) / max(abs(ca), abs(cb), 1e-30)
        return total

    left = list(calls)
    pairs = []
    for i, a in ref_calls:
        if not left:
            break
        best = min(range(len(left)), key=lambda k: distance(a, left[k][1]))
        j, b = left.pop(best)
        pairs.append((i, a, j, b))
    return pairs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="qwen3_moe", choices=sorted(ARCHS))
    parser.add_argument("--backends", default="aot_eager,inductor",
                        help="torch.compile backends, comma-separated; 'dump' is aot_eager "
                             "writing its graphs to --dump-graphs")
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--show", type=int, default=6, help="differing calls printed per backend")
    parser.add_argument("--recipe", default="deepseek_v3", help="an FP8Recipe.from_name preset")
    parser.add_argument("--unfused-permute", action="store_true",
                        help="HF experts gather their rows in high precision, then cast")
    parser.add_argument("--tol", type=float, default=0.05,
                        help="relative checksum difference that counts as a difference")
    parser.add_argument("--dump-graphs", default="graphs",
                        help="where backend 'dump' (aot_eager) writes the AOT graphs")
    parser.add_argument("--no-autocast", action="store_true", help="FP32, no BF16 autocast")
    args = parser.parse_args()
    global AUTOCAST
    AUTOCAST = not args.no_autocast
    from fp8train.ops import gemm as _gemm
    from fp8train.quant import casts as _casts, moe_casts as _moe_casts

    for module, names in ((_casts, ("per_token_cast", "per_token_cast_dual", "per_token_cast_transposed",
                                    "per_block_cast", "per_block_cast_dual")),
                          (_moe_casts, ("per_token_cast_permuted",)),
                          (_gemm, ("fp8_gemm_nt", "m_grouped_fp8_gemm_nt_contiguous",
                                   "k_grouped_fp8_gemm_nt_contiguous"))):
        for name in names:
            wrap(module, name)
    assert _custom_ops._casts is _casts and _custom_ops._gemm is _gemm

    # Bisection switches: each turns one GPU-only path of the FP8 layers off.
    if args.unfused_permute:
        from fp8train.nn import hf
        from fp8train.nn.moe_layout import gather_rows

        fused = hf._grouped_linear

        def unfused(x, weight, layout, recipe, transposed, bias, src_tokens=None):
            if src_tokens is not None:
                x = gather_rows(x, src_tokens)
            return fused(x, weight, layout, recipe, transposed, bias)

        hf._grouped_linear = unfused
    model = tiny_model(args.arch, seed=3).to(args.device)
    fp8train.convert_to_fp8(model, fp8train.FP8Recipe.from_name(args.recipe))
    layer = model.model.layers[0]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, args.tokens, model.config.hidden_size, generator=gen).to(args.device)
    position_ids = torch.arange(args.tokens, device=args.device).unsqueeze(0)
    pos = model.model.rotary_emb(x, position_ids)

    y_ref, g_ref, log_ref = run_layer(layer, layer, x, pos, position_ids, args.device)
    print(f"eager: {len(log_ref)} op calls")
    for backend in args.backends.split(","):
        torch._dynamo.reset()
        compiled = torch.compile(layer, backend=dumping_backend(args.dump_graphs)
                                 if backend == "dump" else backend)
        run_layer(layer, compiled, x, pos, position_ids, args.device)  # compiles
        y, grads, log = run_layer(layer, compiled, x, pos, position_ids, args.device)
        errs = {n: rel_err(grads[n], g_ref[n]) for n in g_ref if n in grads}
        worst = sorted(errs.items(), key=lambda kv: -kv[1])[:5]
        print(f"\n== {backend}: output rel err {rel_err(y, y_ref):.2e}; gradients, worst: "
              + ", ".join(f"{n} {e:.2e}" for n, e in worst))
        print(f"   {len(log)} op calls (eager {len(log_ref)})")
        shown = 0
        compiled_groups = group(log)
        for key, ref_calls in group(log_ref).items():
            calls = compiled_groups.get(key, [])
            if len(calls) != len(ref_calls):
                print(f"   {key[0]} {key[1]}: {len(ref_calls)} calls eager, {len(calls)} compiled")
            for i, a, j, b in pair_calls(ref_calls, calls):
                bad = [(kind, k, da, db) for kind, ea, eb in (("in", a[1], b[1]), ("out", a[2], b[2]))
                       for k, (da, db) in enumerate(zip(ea, eb)) if differs(da, db, args.tol)]
                if not bad or shown >= args.show:
                    continue
                shown += 1
                print(f"   {a[0]}: eager call {i}, compiled call {j}")
                for kind, k, da, db in bad:
                    print(f"     {kind}[{k}] eager    {da[0]} sum={da[1]}\n"
                          f"     {kind}[{k}] compiled {db[0]} sum={db[1]}")
        if not shown:
            print(f"   every call matches eager (layouts exact, checksums within {args.tol:.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
