"""FSDP2 with and without FP8 all-gather: bytes each rank puts on the wire, all-gather time
(GPU), and the training losses of both. Launch one process per GPU:

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
        torchrun --nproc_per_node 2 scripts/fp8_all_gather_bytes.py
    torchrun --nproc_per_node 2 scripts/fp8_all_gather_bytes.py --cpu --dim 256 --ffn 512

The model is a stack of SwiGLU-free MLP pairs shaped like the `small` recipe's MLP (768 ->
3584 -> 768 by default), each FP8Linear its own FSDP unit, BF16 compute
(``MixedPrecisionPolicy(param_dtype=bfloat16)``), FP32 master weights; both runs start from
the same init and see the same tokens. Bytes are counted at ``all_gather_single``'s input
(what this rank contributes); on GPUs the NCCL all-gather kernels are timed from a
``torch.profiler`` trace.
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the repo root: benchmarks/

from benchmarks.collectives import count_all_gather_bytes  # noqa: E402
from fp8train.nn import FP8Linear  # noqa: E402
from fp8train.nn.fsdp import enable_fp8_all_gather  # noqa: E402


def make_model(dim: int, ffn: int, pairs: int, device: torch.device) -> nn.Sequential:
    torch.manual_seed(0)
    layers = []
    for _ in range(pairs):
        layers += [FP8Linear(dim, ffn, bias=False), nn.GELU(), FP8Linear(ffn, dim, bias=False)]
    return nn.Sequential(*layers).to(device)


def run(args, fp8_all_gather: bool, device: torch.device, rank: int, world: int) -> dict:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    model = make_model(args.dim, args.ffn, args.pairs, device)
    if fp8_all_gather:
        enable_fp8_all_gather(model, world)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in model:
        if isinstance(layer, FP8Linear):
            fully_shard(layer, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator(device="cpu").manual_seed(1 + rank)
    x = torch.randn(args.tokens, args.dim, generator=g).to(device)
    y = torch.randn(args.tokens, args.dim, generator=g).to(device)
    losses, gathered = [], []

    def step():
        loss = nn.functional.mse_loss(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad()
        loss = loss.detach()
        dist.all_reduce(loss)
        losses.append(loss.item() / world)

    step()  # warm-up: JIT compiles, NCCL communicators
    losses.clear()
    gather_us = None
    with count_all_gather_bytes(gathered):
        if device.type == "cuda":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                for _ in range(args.steps):
                    step()
                torch.cuda.synchronize()
            gather_us = sum(e.device_time_total for e in prof.key_averages()
                            if "allgather" in e.key.lower().replace("_", ""))
        else:
            for _ in range(args.steps):
                step()
    return {"losses": losses, "bytes": sum(gathered), "gather_us": gather_us}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cpu", action="store_true", help="gloo on CPU (the reference FP8 path)")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--ffn", type=int, default=3584)
    p.add_argument("--pairs", type=int, default=4, help="MLP pairs (two FP8Linear each)")
    p.add_argument("--tokens", type=int, default=8192, help="tokens per rank per step")
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args(argv)
    if "RANK" not in os.environ:
        print("launch with torchrun --nproc_per_node N (see the docstring)", file=sys.stderr)
        return 2
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    if args.cpu:
        torch.set_num_threads(1)
        dist.init_process_group("gloo")
        device = torch.device("cpu")
    else:
        if not torch.cuda.is_available():
            print("no GPU: pass --cpu to run on gloo", file=sys.stderr)
            return 2
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    try:
        bf16 = run(args, False, device, rank, world)
        fp8 = run(args, True, device, rank, world)
    finally:
        dist.barrier()
    if rank == 0:
        ratio = fp8["bytes"] / bf16["bytes"]
        rel = max(abs(a - b) / abs(b) for a, b in zip(fp8["losses"], bf16["losses"]))
        print(f"world {world}, {args.pairs} MLP pairs {args.dim} -> {args.ffn} -> {args.dim}, "
              f"{args.tokens} tokens per rank, {args.steps} steps on {device.type}")
        print(f"all-gather bytes per rank: BF16 {bf16['bytes']:,}  FP8 {fp8['bytes']:,}  ratio {ratio:.4f} "
              f"(target: halved)")
        if bf16["gather_us"] is not None:
            print(f"all-gather kernel time: BF16 {bf16['gather_us'] / 1e3:.2f} ms  FP8 "
                  f"{fp8['gather_us'] / 1e3:.2f} ms  ratio {fp8['gather_us'] / max(bf16['gather_us'], 1e-9):.3f}")
        print("losses BF16 gather:", " ".join(f"{v:.5f}" for v in bf16["losses"]))
        print("losses FP8 gather: ", " ".join(f"{v:.5f}" for v in fp8["losses"]))
        print(f"largest relative loss difference {rel:.2e}")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
