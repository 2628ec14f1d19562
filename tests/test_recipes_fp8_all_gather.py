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
    with pytest.raises(SystemExit, match=r"fp8_all_gather=true needs an FSDP2 launch.*this one is NO"):
        train(tmp_path, "tiny", "--precision=fp8", "fp8_all_gather=true")
