"""The recipe's fp8_all_gather flag: refused where it cannot act. (Its effect, FSDP2 gathering
FP8 weights, runs only under an FSDP2 launch, which accelerate allows only on accelerators;
the same wrapping under fully_shard is tested on CPU in test_nn_distributed.py.)"""
import pytest

from recipes.config import ConfigError, load_config
from test_recipes_train import CONFIGS, train


def test_fp8_all_gather_needs_fp8_precision():
    with pytest.raises(ConfigError, match="fp8_all_gather=true needs precision=fp8"):
        load_config(CONFIGS / "tiny.yaml", ["fp8_all_gather=true"], precision="bf16")
    assert load_config(CONFIGS / "tiny.yaml", ["fp8_all_gather=true"]).fp8_all_gather is True


def test_fp8_all_gather_needs_an_fsdp2_launch(tmp_path):
    with pytest.raises(SystemExit,
                       match=r"fp8_all_gather=true needs an FSDP2 launch.*this one is NO"):
        train(tmp_path, "tiny", "--precision=fp8", "fp8_all_gather=true")


def _accelerate_worker() -> None:
    """accelerate's own FSDP2 prepare (what pretrain.py runs under fsdp2.yaml) of FP8Linear
    weights wrapped for FP8 all-gather, on gloo. accelerate turns an FSDP request into plain
    data parallelism on CPU, so its state is set to FSDP after construction: the prepare
    code that runs is the same as on GPUs (fully_shard per module, optimizer re-pointed at
    the sharded parameters by data_ptr)."""
    import warnings

    warnings.simplefilter("ignore")
    import torch
    from accelerate import Accelerator, FullyShardedDataParallelPlugin
    from accelerate.utils import DistributedType

    from fp8train.nn import FP8AllGatherWeight, enable_fp8_all_gather
    from test_nn_distributed import STEPS, make_batch, make_model

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, reshard_after_forward=True)
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    rank = accelerator.process_index
    x, y = (t.chunk(accelerator.num_processes)[rank] for t in make_batch())
    for fp8_all_gather in (False, True):
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
        model = make_model()
        if fp8_all_gather:
            wrapped = enable_fp8_all_gather(model, accelerator.num_processes)
            assert wrapped == ["0.weight", "2.weight"], wrapped
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        model, opt = accelerator.prepare(model, opt)
        assert isinstance(model[0].weight.to_local(), FP8AllGatherWeight) == fp8_all_gather
        # Every optimizer parameter is one of the model's sharded ones (none left behind).
        assert {id(p) for g in opt.param_groups for p in g["params"]} == \
            {id(p) for p in model.parameters()}
        losses = []
        for _ in range(STEPS):
            loss = torch.nn.functional.mse_loss(model(x).float(), y)
            accelerator.backward(loss)
            opt.step()
            opt.zero_grad()
            losses.append(accelerator.reduce(loss.detach(), reduction="mean").item())
        if accelerator.is_main_process:
            print("LOSSES", fp8_all_gather, " ".join(f"{v:.9g}" for v in losses))
    accelerator.wait_for_everyone()
    accelerator.end_training()


def test_accelerate_fsdp2_prepare_with_fp8_all_gather():
    import os
    import subprocess
    import sys

    root = CONFIGS.parents[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--rdzv_backend", "c10d", "--rdzv_endpoint", "localhost:0", __file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(root), str(root / "tests")])}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r.split()[1]: [float(v) for v in r.split()[2:]]
            for r in proc.stdout.splitlines() if r.startswith("LOSSES")}
    # FP32 parameters: the FP8 gather yields exactly the FP8 weights a cast after a plain
    # gather does (see test_nn_distributed), so the runs are identical, and they train.
    assert rows["True"] == rows["False"] and len(rows["True"]) == 4, rows
    assert rows["True"][-1] < rows["True"][0]


if __name__ == "__main__":
    import os
    import sys

    import torch.distributed as dist

    _accelerate_worker()
    if dist.is_initialized():
        dist.destroy_process_group()
    # As in test_recipes_fsdp2: skip static destructors, which gloo's threads can abort.
    sys.stdout.flush()
    os._exit(0)
