"""FSDP2 of the recipe's FP8 model on two CPU processes over gloo.

accelerate runs FSDP only on accelerators (on a CPU it turns an FSDP launch into plain data
parallelism), so recipes/accelerate/fsdp2.yaml cannot run here. This checks the part that
can: ``fully_shard`` of each decoder Block (as fsdp2.yaml wraps them) around FP8Linear and
FP8MoE, two training steps against the unsharded model on the whole batch. This file is
also the worker that torchrun starts.
"""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _worker(config: str) -> None:
    import warnings

    warnings.simplefilter("ignore")  # the reference path's note, once per GEMM kind
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import fp8train
    from recipes.config import load_config
    from recipes.model import Transformer

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = load_config(ROOT / "recipes" / "configs" / f"{config}.yaml")

    def build():
        torch.manual_seed(0)
        model = Transformer(cfg.model, max_seq_len=64)
        fp8train.convert_to_fp8(model)
        return model

    ref, model = build(), build()
    for block in model.layers:
        fully_shard(block)
    fully_shard(model)
    x = torch.randint(0, 256, (4 * world, 64), generator=torch.Generator().manual_seed(1))
    # Plain SGD: unlike Adam, its step scales with the gradient, so a gradient summed instead
    # of averaged across processes (or not reduced at all) shows in the next loss.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.5)
    for step in range(2):
        _, loss = model(x.chunk(world)[rank], x.chunk(world)[rank])
        loss.backward()
        opt.step()
        opt.zero_grad()
        _, ref_loss = ref(x, x)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        dist.all_reduce(loss := loss.detach().clone())
        if rank == 0:
            print(f"LOSS {step} {loss.item() / world:.8f} {ref_loss.item():.8f} "
                  f"{type(model.layers[0].attn.wq).__name__} {type(model.layers[0].mlp).__name__}")
    dist.barrier()
    dist.destroy_process_group()
    # Leave without running C++ static destructors: gloo's threads at interpreter exit can
    # abort a process ("terminate called without an active exception") after the work is done.
    sys.stdout.flush()
    os._exit(0)


@pytest.mark.parametrize("config, mlp", [("tiny", "MLP"), ("tiny-moe", "FP8MoE")])
def test_fsdp2_of_fp8_model_matches_unsharded_training(config, mlp):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__, config]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [line.split() for line in proc.stdout.splitlines() if line.startswith("LOSS")]
    assert [r[1] for r in rows] == ["0", "1"]
    for _, step, sharded, whole, linear, block in rows:
        assert (linear, block) == ("FP8Linear", mlp)
        # Same weights, the batch split in two equal halves: the mean of the halves' losses is
        # the whole batch's loss up to float32 rounding. After one SGD step from gradients
        # reduced across processes (vs computed whole), the losses still agree to 1e-4.
        assert abs(float(sharded) - float(whole)) <= (1e-6 if step == "0" else 1e-4) * float(whole)


if __name__ == "__main__":
    _worker(sys.argv[1])
