"""Where an FP8 training step's time goes, on the GPU (bench hf's models and layers).

    python scripts/profile_step.py steps  --model llama-1b [--compiled] [--layer-check] [--out DIR]
    python scripts/profile_step.py layers [--tokens 8192]
    python scripts/profile_step.py numerics --model llama-1b

steps: BF16 and FP8 training steps of the model as ``bench hf`` builds it: tokens/s, and for
one step queued while the GPU is held busy, its host time and its GPU time (a step that
syncs shows a host time as long as the sleep); then a ``torch.profiler`` table of two FP8
steps, by self CPU time and by GPU time (written under --out). ``--layer-check`` runs the
bench's per-layer kernel check first, as ``bench hf`` does.
layers: host and GPU time of one forward+backward of ``FP8Linear`` against ``nn.Linear``
(--tokens x 4096 -> 14336; ``--cprofile``: its Python functions by own time) and of a
converted HF Llama decoder layer against its BF16 twin,
FP8 as shipped and keeping the forward's (W^T)_q; ``--profile-layers`` adds where each
decoder layer's host time goes (torch.profiler, CPU).
numerics: each decoder layer's and each FP8Linear's output, GPU paths against the reference
emulation on the same input, beside the reference's own spread when its input moves by one
BF16 ulp; and every GEMM shape of the model on cuBLAS and native against the reference.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fp8train import FP8Linear, FP8Recipe, convert_to_fp8, ops  # noqa: E402
from benchmarks import hf as bench_hf  # noqa: E402
from benchmarks.gemm import rel_err as _rel  # noqa: E402
from benchmarks.hf import one_ulp_nudge as _ulp_nudge  # noqa: E402

SLEEP_CYCLES = 4_000_000_000  # ~2 s at the H100's clock: longer than any step's host time


def host_and_gpu_ms(fn, repeats: int = 3):
    """(host ms, GPU ms) of one call of ``fn`` queued while the GPU sleeps, medians."""
    fn()
    torch.cuda.synchronize()
    host, gpu = [], []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(SLEEP_CYCLES)
        start.record()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        end.record()
        end.synchronize()
        host.append((t1 - t0) * 1e3)
        gpu.append(start.elapsed_time(end))
    return statistics.median(host), statistics.median(gpu)


def _table(prof, sort_by: str, limit: int) -> str:
    try:
        return prof.key_averages().table(sort_by=sort_by, row_limit=limit, max_name_column_width=60)
    except (AttributeError, KeyError, ValueError):
        return prof.key_averages().table(sort_by=sort_by.replace("device", "cuda"), row_limit=limit,
                                         max_name_column_width=60)


def run_steps(args) -> None:
    spec = bench_hf.MODELS[args.model]
    batch, seq = args.batch, 2048
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for fp8 in (False, True):
        model = bench_hf._build(spec, seq, seed=0)
        if fp8:
            convert_to_fp8(model)
        ids = torch.randint(0, spec["vocab_size"], (batch, seq), device="cuda")
        if fp8 and args.layer_check:
            errs = bench_hf._layer_native_errs(model, ids[:1])[0]
            print(f"layer check: worst {max(errs):.4f}")
        if args.compiled:
            for layer in model.model.layers:
                layer.compile()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
        step = lambda: bench_hf._step(model, opt, ids)  # noqa: E731
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            step()
        torch.cuda.synchronize()
        seconds = (time.perf_counter() - t0) / args.steps
        host, gpu = host_and_gpu_ms(step)
        name = f"{args.model} {'fp8' if fp8 else 'bf16'} {'compiled' if args.compiled else 'eager'}"
        print(f"{name}: {batch * seq / seconds:,.0f} tok/s, step {seconds * 1e3:.1f} ms; one step "
              f"queued on a busy GPU: host {host:.1f} ms, GPU {gpu:.1f} ms", flush=True)
        acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        tag = f"{args.model}_{'fp8' if fp8 else 'bf16'}_{'compiled' if args.compiled else 'eager'}"
        for sort_by, limit in (("self_cpu_time_total", 45), ("self_device_time_total", 30)):
            text = _table(prof, sort_by, limit)
            (out_dir / f"{tag}_{sort_by}.txt").write_text(text)
            if fp8 or sort_by == "self_cpu_time_total":
                print(f"--- {name}, two steps, by {sort_by}\n{text}", flush=True)
        model = opt = None  # free them before the next precision's model
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def _decoder_layer(recipe):
    """A 1B-class HF Llama decoder layer (bench hf's llama-1b), converted with ``recipe``
    unless it is None."""
    from transformers import AutoConfig
    from transformers.models.llama import modeling_llama

    spec = dict(bench_hf.MODELS["llama-1b"])
    config = AutoConfig.for_model(spec.pop("model_type"), max_position_embeddings=2048, **spec)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    layer = modeling_llama.LlamaDecoderLayer(config, 0).cuda()
    rotary = modeling_llama.LlamaRotaryEmbedding(config).cuda()
    if recipe is not None:
        convert_to_fp8(layer, recipe)
    return layer, rotary


# (label, recipe): BF16, FP8 as shipped, FP8 keeping the forward's (W^T)_q for dgrad (one
# weight cast a step fewer, one byte per weight element held until backward), and FP8 with
# every GEMM on the native kernels instead of cuBLAS.
_LAYER_VARIANTS = (("BF16", None), ("FP8", FP8Recipe()), ("FP8 W^T kept", FP8Recipe(save_fp8_weight=True)),
                   ("FP8 native", FP8Recipe(backend="native")))


def _slug(label: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in label.lower())


def _cprofile(step, path: Path, steps: int = 20) -> None:
    """Python functions by own time over ``steps`` calls of ``step`` queued behind a busy
    GPU (so no call waits on a kernel), in microseconds per step; written to ``path``, the
    top lines printed."""
    import cProfile
    import pstats

    torch.cuda.synchronize()
    torch.cuda._sleep(SLEEP_CYCLES)
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(steps):
        step()
    profiler.disable()
    torch.cuda.synchronize()
    rows = sorted(pstats.Stats(profiler).stats.items(), key=lambda kv: -kv[1][2])
    lines = [f"{'own us/step':>11s} {'cum us/step':>11s} {'calls/step':>10s}  function"]
    for (file, line, name), (_, calls, own, cum, _) in rows[:40]:
        where = name if file == "~" else f"{Path(file).name}:{line}({name})"
        lines.append(f"{own / steps * 1e6:11.1f} {cum / steps * 1e6:11.1f} {calls / steps:10.1f}  {where}")
    path.write_text("\n".join(lines) + "\n")
    print(f"--- cProfile of {steps} steps ({path})\n" + "\n".join(lines[:26]), flush=True)


def run_layers(args) -> None:
    t = args.tokens
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    for label, recipe in _LAYER_VARIANTS:
        torch.manual_seed(0)
        lin = (torch.nn.Linear(4096, 14336, bias=False) if recipe is None
               else FP8Linear(4096, 14336, bias=False, recipe=recipe)).cuda()
        x = torch.randn(t, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        dy = torch.randn(t, 14336, device="cuda", dtype=torch.bfloat16)

        def linear_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                # A new view each step, as training hands every layer a new input: the
                # sibling-layer cast cache must not serve the previous step's cast.
                y = lin(x.view_as(x))
            y.backward(dy)

        host, gpu = host_and_gpu_ms(linear_step, 5)
        print(f"{label:10s} linear {t}x4096->14336 fwd+bwd: host {host:.2f} ms, GPU {gpu:.2f} ms", flush=True)
        if args.cprofile:
            _cprofile(linear_step, out_dir / f"linear_{_slug(label)}_cprofile.txt")
    for label, recipe in _LAYER_VARIANTS:
        layer, rotary = _decoder_layer(recipe)
        batch = t // 2048
        h = torch.randn(batch, 2048, 2048, device="cuda", requires_grad=True)
        pos = torch.arange(2048, device="cuda")[None].expand(batch, -1)
        dy = torch.randn(batch, 2048, 2048, device="cuda", dtype=torch.bfloat16)

        def layer_step():
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(h, position_embeddings=rotary(h, pos))
                out = out[0] if isinstance(out, tuple) else out
            out.backward(dy)

        host, gpu = host_and_gpu_ms(layer_step, 5)
        print(f"{label:10s} LlamaDecoderLayer {batch}x2048 fwd+bwd: host {host:.2f} ms, GPU {gpu:.2f} ms",
              flush=True)
        if args.profile_layers:
            # CPU activity only: where the host time of one layer step goes, op by op.
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    layer_step()
            torch.cuda.synchronize()
            text = _table(prof, "self_cpu_time_total", 40)
            (out_dir / f"layer_{_slug(label)}_self_cpu.txt").write_text(text)
            print(f"--- {label} decoder layer, three steps, by self CPU time\n{text}", flush=True)


def run_numerics(args) -> None:
    spec = bench_hf.MODELS[args.model]
    model = bench_hf._build(spec, 2048, seed=0)
    convert_to_fp8(model)
    ids = torch.randint(0, spec["vocab_size"], (1, 2048), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    ops.set_backend("reference")
    reference = bench_hf._layer_outputs(model, ids)
    ops.set_backend("auto")
    native = bench_hf._layer_outputs(model, ids, inputs=[inp for inp, _ in reference])
    ops.set_backend("reference")
    nudged = bench_hf._layer_outputs(model, ids, inputs=[_ulp_nudge(inp, i) for i, (inp, _) in
                                                          enumerate(reference)])
    ops.set_backend("auto")
    print("layer  GPU-vs-ref  ref(1-ulp input)-vs-ref")
    for i, ((_, got), (_, want), (_, moved)) in enumerate(zip(native, reference, nudged)):
        print(f"{i:5d}  {_rel(got, want):10.4f}  {_rel(moved, want):10.4f}")
    # Every FP8Linear of layer 0 and the last layer on its reference input.
    for idx in (0, len(model.model.layers) - 1):
        inputs = {}
        layer = model.model.layers[idx]
        def keep_input(module, args, output, name):
            inputs.setdefault(name, args[0].detach())  # returns None: the output stays as it is

        hooks = [m.register_forward_hook(lambda mod, a, o, name=name: keep_input(mod, a, o, name))
                 for name, m in layer.named_modules() if isinstance(m, FP8Linear)]
        ops.set_backend("reference")
        bench_hf._layer_outputs(model, ids)
        for hk in hooks:
            hk.remove()
        for name, m in layer.named_modules():
            if not isinstance(m, FP8Linear):
                continue
            x = inputs[name]
            with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                ops.set_backend("reference")
                want = m(x)
                moved = m(_ulp_nudge(x, 7))
                errs = []
                for backend in ("auto", "cublas", "native"):
                    ops.set_backend(backend)
                    try:
                        errs.append(f"{backend} {_rel(m(x), want):.5f}")
                    except RuntimeError as e:
                        errs.append(f"{backend} n/a ({str(e)[:40]})")
            print(f"layer {idx} {name} {tuple(x.shape)}: {', '.join(errs)}; ref 1-ulp {_rel(moved, want):.5f}")
    ops.set_backend("auto")
    from fp8train.quant import per_block_cast, per_token_cast

    hidden, inter = spec["hidden_size"], spec["intermediate_size"]
    q = spec["num_attention_heads"] * spec["head_dim"]
    kv = spec["num_key_value_heads"] * spec["head_dim"]
    linears = {(hidden, q), (hidden, kv), (q, hidden), (hidden, inter), (inter, hidden)}
    for t in (2048, 8192):
        for k_in, n_out in sorted(linears):
            for kind, (m, n, k) in (("fprop", (t, n_out, k_in)), ("dgrad", (t, k_in, n_out)),
                                    ("wgrad", (n_out, k_in, t))):
                a = per_token_cast(torch.randn(m, k, device="cuda"))
                b = (per_token_cast if kind == "wgrad" else per_block_cast)(torch.randn(n, k, device="cuda"))
                ops.set_backend("reference")
                want = ops.fp8_gemm_nt(a, b, out_dtype=torch.float32)
                res = []
                for backend in ("cublas",):
                    ops.set_backend(backend)
                    try:
                        res.append(f"{backend} {_rel(ops.fp8_gemm_nt(a, b, out_dtype=torch.float32), want):.2e}")
                    except RuntimeError:
                        res.append(f"{backend} n/a")
                print(f"gemm {kind} {m}x{n}x{k}: {', '.join(res)}", flush=True)
    ops.set_backend("auto")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=["steps", "layers", "numerics"])
    parser.add_argument("--model", default="llama-1b", choices=list(bench_hf.MODELS))
    parser.add_argument("--compiled", action="store_true")
    parser.add_argument("--layer-check", action="store_true")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--out", default="profile_out")
    parser.add_argument("--profile-layers", action="store_true",
                        help="layers: a torch.profiler table (CPU) of three decoder-layer steps per variant")
    parser.add_argument("--cprofile", action="store_true",
                        help="layers: Python functions by own time over 20 linear steps per variant")
    args = parser.parse_args()
    {"steps": run_steps, "layers": run_layers, "numerics": run_numerics}[args.what](args)


if __name__ == "__main__":
    main()
