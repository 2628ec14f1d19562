"""recipes/config.py and recipes/data.py: typed config, override files, deterministic batches."""
from pathlib import Path

import pytest
import torch

from recipes.config import ConfigError, config_diff, config_from_dict, load_config
from recipes.data import Batches, load_corpus

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads_in_both_precisions(path):
    for precision in ("fp8", "bf16"):
        cfg = load_config(path, precision=precision)
        assert cfg.run_name == f"{path.stem}-{precision}"
        # Resolved configs round-trip through their saved form.
        assert config_from_dict(cfg.to_dict()) == cfg


def test_shipped_configs_are_the_issue_s_five():
    assert {p.stem for p in CONFIGS.glob("*.yaml")} >= {"tiny", "tiny-moe", "small", "1b", "moe-1b"}


def test_unknown_keys_are_rejected_with_a_suggestion(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("lrr: 0.1\n")
    with pytest.raises(ConfigError, match=r"unknown key 'lrr'; did you mean 'lr'\?"):
        load_config(bad)
    bad.write_text("model:\n  dimm: 256\n")
    with pytest.raises(ConfigError, match=r"unknown key model\.'dimm'.*did you mean model\.'dim'"):
        load_config(bad)
    with pytest.raises(ConfigError, match="unknown key 'max_step'"):
        load_config(CONFIGS / "tiny.yaml", ["max_step=3"])
    with pytest.raises(ConfigError, match="not of the form key=value"):
        load_config(CONFIGS / "tiny.yaml", ["max_steps"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_typed():
    cfg = load_config(CONFIGS / "tiny.yaml", ["lr=3e-4", "model.dim=256", "compile=true", "run_name=7"])
    assert cfg.lr == 3e-4 and isinstance(cfg.lr, float)  # YAML reads "3e-4" as a string
    assert cfg.model.dim == 256 and cfg.compile is True and cfg.run_name == "7"
    with pytest.raises(ConfigError, match="max_steps must be an int, got 'ten'"):
        load_config(CONFIGS / "tiny.yaml", ["max_steps=ten"])
    with pytest.raises(ConfigError, match="compile must be a bool"):
        load_config(CONFIGS / "tiny.yaml", ["compile=3"])
    with pytest.raises(ConfigError, match="precision must be one of"):
        load_config(CONFIGS / "tiny.yaml", ["precision=fp16"])


def test_torchao_precision_takes_dense_models_with_dims_multiple_of_16():
    """torchao's float8 tensorwise, the anchor: dense recipe models only (its MoE row is in
    bench hf), every linear dim a multiple of 16."""
    cfg = load_config(CONFIGS / "tiny.yaml", precision="torchao")
    assert cfg.run_name == "tiny-torchao"
    with pytest.raises(ConfigError, match="precision=torchao converts dense recipe models only"):
        load_config(CONFIGS / "tiny-moe.yaml", precision="torchao")
    with pytest.raises(ConfigError, match=r"multiple of 16.*'ffn_dim': 200"):
        load_config(CONFIGS / "tiny.yaml", ["model.ffn_dim=200"], precision="torchao")
    with pytest.raises(ConfigError, match="need precision=fp8"):
        load_config(CONFIGS / "tiny.yaml", ["fp8_wgrad=false"], precision="torchao")


def test_fp8_needs_linear_dims_that_are_multiples_of_128():
    with pytest.raises(ConfigError, match=r"multiple of 128.*'dim': 192"):
        load_config(CONFIGS / "tiny.yaml", ["model.dim=192", "model.n_heads=3"], precision="fp8")
    # The same shape is fine in BF16, where nothing is converted.
    assert load_config(CONFIGS / "tiny.yaml", ["model.dim=192", "model.n_heads=3"], precision="bf16")


@pytest.mark.parametrize("override, message", [
    ("warmup_steps=500", "exceeds max_steps"),
    ("model.n_heads=3", "not divisible"),
    ("min_lr=1.0", "min_lr <= lr"),
    ("val_fraction=1.5", "val_fraction"),
    ("model.n_experts=2 model.moe_top_k=3", "moe_top_k=3 must be in"),
    ("model.n_experts=4 model.moe_first_dense_layers=2", "leaves no MoE block"),
])
def test_config_values_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(CONFIGS / "tiny.yaml", override.split())


def test_config_diff_ignores_run_control_keys():
    a = load_config(CONFIGS / "tiny.yaml")
    b = load_config(CONFIGS / "tiny.yaml", ["stop_after_steps=5", "progress_bar=false"])
    assert config_diff(a, b) == {}
    c = load_config(CONFIGS / "tiny.yaml", ["model.dim=256"])
    assert config_diff(a, c) == {"model.dim": (128, 256)}


def test_default_corpus_is_the_stdlib_and_batches_are_deterministic():
    corpus = load_corpus("", max_bytes=100_000, val_fraction=0.1, min_tokens=65)
    assert len(corpus.train) + len(corpus.val) == 100_000 and len(corpus.val) == 10_000
    assert "stdlib" in corpus.description
    a = Batches(corpus, seq_len=64, batch_size=4, seed=1)
    b = Batches(load_corpus("", 100_000, 0.1, 65), seq_len=64, batch_size=4, seed=1)
    x, y = a.get("train", step=7, micro_step=1)
    assert x.shape == (4, 64) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])  # targets are the inputs shifted by one
    assert torch.equal(x, b.get("train", 7, 1)[0])  # same coordinates, same batch
    assert not torch.equal(x, a.get("train", 8, 1)[0])  # another step, another batch
    assert not torch.equal(x, Batches(corpus, 64, 4, seed=1, rank=1).get("train", 7, 1)[0])
    assert not torch.equal(a.get("val", 0)[0], a.get("train", 0)[0])


def test_data_path_reads_a_folder_and_rejects_what_is_too_small(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 50)
    (tmp_path / "b.bin").write_bytes(b"\0\1\2" * 100)  # binary: skipped
    corpus = load_corpus(str(tmp_path), max_bytes=0, val_fraction=0.2, min_tokens=17)
    assert len(corpus.train) + len(corpus.val) == 600
    with pytest.raises(ValueError, match="seq_len"):
        load_corpus(str(tmp_path / "a.txt"), max_bytes=0, val_fraction=0.01, min_tokens=129)
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_corpus(str(tmp_path / "nope"), 0, 0.1, 2)


@pytest.mark.parametrize("name, kind, processes", [
    ("single_gpu", "NO", 1), ("ddp", "MULTI_GPU", 8), ("fsdp2", "FSDP", 8), ("cpu_2proc", "MULTI_GPU", 2)])
def test_accelerate_configs_load(name, kind, processes):
    """The launch files parse as accelerate reads them (cpu_2proc uses the torchrun launcher:
    see its comment)."""
    from accelerate.commands.config.config_args import load_config_from_file

    cfg = load_config_from_file(str(CONFIGS.parent / "accelerate" / f"{name}.yaml"))
    assert cfg.distributed_type.value == kind and cfg.num_processes == processes
    assert cfg.mixed_precision == "bf16"
    if name == "fsdp2":
        assert cfg.fsdp_config["fsdp_version"] == 2
        # The wrap class must be the recipe model's block, by name.
        from recipes.model import Block
        assert cfg.fsdp_config["fsdp_transformer_layer_cls_to_wrap"] == Block.__name__


def test_fp8_recipe_options_reach_the_converted_layers():
    """fp8_pow2_scale / fp8_fprop / fp8_dgrad / fp8_wgrad (the loss-gap ablations) build the
    FP8Recipe the run converts with; they need precision=fp8."""
    import fp8train
    from recipes.model import build_model

    cfg = load_config(CONFIGS / "tiny-moe.yaml", ["fp8_wgrad=false", "fp8_pow2_scale=true"], precision="fp8")
    recipe = cfg.fp8_recipe()
    assert (recipe.pow2_scale, recipe.fprop_fp8, recipe.dgrad_fp8, recipe.wgrad_fp8) == (True, True, True, False)
    model = build_model(cfg.model, max_seq_len=cfg.seq_len)
    fp8train.convert_to_fp8(model, recipe=recipe)
    layers = [m for m in model.modules() if isinstance(m, (fp8train.nn.FP8Linear, fp8train.nn.FP8GroupedLinear))]
    assert layers and all(m.recipe == recipe for m in layers)
    with pytest.raises(ConfigError, match="need precision=fp8"):
        load_config(CONFIGS / "tiny.yaml", ["fp8_wgrad=false"], precision="bf16")


def test_init_seed_changes_the_weights_not_the_batches():
    """init_seed (the noise-floor runs): the init follows it when set, the batches follow seed."""
    from accelerate.utils import set_seed

    from recipes.model import build_model

    default = load_config(CONFIGS / "tiny.yaml")
    other = load_config(CONFIGS / "tiny.yaml", ["init_seed=7"])
    assert default.model_seed() == default.seed and other.model_seed() == 7
    assert other.seed == default.seed  # the batches are a function of seed alone (recipes/data.py)

    def first_weight(cfg):
        set_seed(cfg.model_seed())
        return next(build_model(cfg.model, max_seq_len=cfg.seq_len).parameters()).detach().clone()

    assert torch.equal(first_weight(default), first_weight(default))
    assert not torch.equal(first_weight(default), first_weight(other))
    with pytest.raises(ConfigError, match="init_seed"):
        load_config(CONFIGS / "tiny.yaml", ["init_seed=-2"])
