"""recipes/pretrain.py and recipes/compare.py end to end on CPU, with tiny step counts.

Runs happen in this process (``pretrain.main(argv)``) to skip a Python start-up per run; the
accelerate state singleton is reset after each so runs do not see each other's settings.
"""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from numerics import rel_err
from recipes import compare, pretrain
from recipes.config import load_config
from recipes.metrics import read_jsonl

CONFIGS = Path(__file__).resolve().parents[1] / "recipes" / "configs"
# Few, short steps on a small slice of the corpus: each run takes a few seconds on 2 cores.
FAST = ["max_steps=6", "warmup_steps=2", "log_interval=2", "eval_interval=3", "eval_batches=1",
        "checkpoint_interval=3", "micro_batch_size=8", "seq_len=64", "data_max_bytes=200000",
        "progress_bar=false", "lr=1e-2", "min_lr=1e-3"]


def train(tmp_path: Path, config: str, *extra: str) -> Path:
    from accelerate.state import AcceleratorState

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the reference path's "runs on the reference" note
            return pretrain.main(["--config", str(CONFIGS / f"{config}.yaml"), *FAST,
                                  f"out_dir={tmp_path}", *extra])
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl") if "loss" in r}


def check_run(run_dir: Path, precision: str) -> None:
    """Loss falls, the records and checkpoints are where they should be."""
    curve = losses(run_dir)
    assert sorted(curve) == [1, 2, 4, 6]  # the first step, then every log_interval
    assert curve[6] < curve[1] - 0.3, curve  # starts near ln(256) = 5.55
    records = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records if "val_loss" in r] == [3, 6]
    assert all(r["tokens_per_s"] > 0 and r["peak_mem_gb"] > 0 for r in records if "loss" in r)
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == ["step_000003", "step_000006"]
    assert (run_dir / "checkpoints" / "step_000006" / "model.safetensors").is_file()
    assert "precision: " + precision in (run_dir / "checkpoints" / "step_000006" / "config.yaml").read_text()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["precision"] == precision


def check_fp8_export(run_dir: Path, weight: str = "layers.0.mlp.w1.weight") -> None:
    """The final weights in the HF fine-grained FP8 format: e4m3 + 128x128 scales, head kept."""
    from safetensors import safe_open

    with safe_open(run_dir / "model_fp8.safetensors", "pt") as f:
        keys = set(f.keys())
        w_fp8, w_scale = f.get_tensor(weight), f.get_tensor(weight + "_scale_inv")
        assert w_fp8.dtype == torch.float8_e4m3fn and w_scale.dtype == torch.float32
        assert w_scale.shape[-2:] == (w_fp8.shape[-2] // 128, w_fp8.shape[-1] // 128)
        assert f.get_tensor("lm_head.weight").dtype == torch.float32
        exported_head = f.get_tensor("lm_head.weight")
    assert "lm_head.weight_scale_inv" not in keys
    # The trained weights, not a fresh init: the last checkpoint's, the FP8 one within its
    # quantization error.
    last = sorted((run_dir / "checkpoints").glob("step_*"))[-1]
    with safe_open(last / "model.safetensors", "pt") as f:
        trained_head, trained_w = f.get_tensor("lm_head.weight"), f.get_tensor(weight)
    assert torch.equal(exported_head, trained_head)
    blocks = w_scale.repeat_interleave(128, -2).repeat_interleave(128, -1)
    assert rel_err(w_fp8.float() * blocks, trained_w) < 0.05


def check_resume_matches(tmp_path: Path, config: str, precision: str, full: Path) -> None:
    """Stop at step 5 and lose that checkpoint (a crash after step 5): resuming from step 3,
    mid log window, must write the same records as `full`, which never stopped."""
    name = f"{config}-{precision}-resumed"
    common = [f"--precision={precision}", f"run_name={name}"]
    cut = train(tmp_path, config, *common, "stop_after_steps=5")
    assert max(losses(cut)) == 4 and 5 not in losses(cut)  # no record at a mere stop
    shutil.rmtree(cut / "checkpoints" / "step_000005")
    resumed = train(tmp_path, config, *common, "--resume")
    expected = read_jsonl(full / "metrics.jsonl")
    got = read_jsonl(resumed / "metrics.jsonl")
    key = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens")
    assert [{k: r.get(k) for k in key} for r in got] == [{k: r.get(k) for k in key} for r in expected]


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tiny_trains_checkpoints_and_resumes_exactly(tmp_path, precision):
    full = train(tmp_path, "tiny", f"--precision={precision}")
    check_run(full, precision)
    check_resume_matches(tmp_path, "tiny", precision, full)
    if precision == "fp8":
        check_fp8_export(full)


def test_resume_refuses_a_changed_config(tmp_path):
    train(tmp_path, "tiny", "--precision=bf16", "max_steps=3", "warmup_steps=1")
    with pytest.raises(SystemExit, match=r"config differs.*'lr': \(0.01, 0.005\)"):
        train(tmp_path, "tiny", "--precision=bf16", "max_steps=3", "warmup_steps=1", "lr=5e-3", "--resume")
    with pytest.raises(SystemExit, match="no complete checkpoint"):
        train(tmp_path, "tiny", "--precision=bf16", "run_name=never-ran", "--resume")


def test_compare_writes_png_table_and_report(tmp_path, capsys):
    a = train(tmp_path, "tiny", "--precision=bf16", "run_name=a")
    b = train(tmp_path, "tiny", "--precision=bf16", "run_name=b", "lr=5e-3")
    capsys.readouterr()
    out = tmp_path / "cmp"
    assert compare.main([str(a), str(b), "--window", "3", "--out", str(out)]) == 2
    assert "differ in more than the precision: {'lr': (0.01, 0.005)}" in capsys.readouterr().err
    rc = compare.main([str(a), str(b), "--window", "3", "--out", str(out), "--max-rel-err", "1e-9",
                       "--allow-mismatch"])
    printed = capsys.readouterr().out
    assert "mismatch (compared anyway, --allow-mismatch): {'lr': (0.01, 0.005)}" in printed
    assert rc == 1  # two different learning rates cannot agree to 1e-9
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (out / "report.md").read_text()
    assert "| metric | a | b | ratio |" in printed and "| metric | a | b | ratio |" in report
    assert "steps 4-6 (2 records)" in report and "FAIL" in report
    la, lb = losses(a), losses(b)
    mean_a, mean_b = (la[4] + la[6]) / 2, (lb[4] + lb[6]) / 2
    assert f"{abs(mean_a / mean_b - 1):.4%}" in report
    # Signed error per 3-step window from the start: where a gap opens and closes.
    first = [s for s in la if s <= 3]
    first_err = sum(la[s] for s in first) / sum(lb[s] for s in first) - 1
    assert f"{min(first)}-{max(first)}: {first_err:+.2%}, 4-6: {mean_a / mean_b - 1:+.2%}" in report
    # A run compared with itself: zero error, ratios 1, every bar passes.
    assert compare.main([str(a), str(a), "--out", str(tmp_path / "self"), "--max-rel-err", "0",
                         "--max-mem-ratio", "1"]) == 0


@pytest.mark.parametrize("precision", ["bf16", "fp8"])
def test_tiny_moe_trains_checkpoints_and_resumes_exactly(tmp_path, precision):
    full = train(tmp_path, "tiny-moe", f"--precision={precision}")
    check_run(full, precision)
    check_resume_matches(tmp_path, "tiny-moe", precision, full)
    if precision == "fp8":
        check_fp8_export(full, "layers.0.mlp.experts_gate_up.weight")


def test_cli_rejects_unknown_keys():
    with pytest.raises(SystemExit, match=r"config error: override 'lrr=1': unknown key 'lrr'; did you mean 'lr'"):
        pretrain.main(["--config", str(CONFIGS / "tiny.yaml"), "lrr=1"])


def test_torchao_precision_without_torchao_says_how_to_get_it(tmp_path, monkeypatch):
    """A config error before the run folder is touched, naming the install."""
    monkeypatch.setattr(pretrain.importlib.util, "find_spec",
                        lambda name, *a: None if name == "torchao" else importlib.util.find_spec(name, *a))
    with pytest.raises(SystemExit, match="precision=torchao needs torchao: pip install torchao"):
        pretrain.main(["--config", str(CONFIGS / "tiny.yaml"), "--precision=torchao", f"out_dir={tmp_path}"])
    assert not any(tmp_path.iterdir())


def test_torchao_conversion_covers_every_linear_but_the_head():
    pytest.importorskip("torchao.float8")
    from torchao.float8.float8_linear import Float8Linear

    from recipes.model import build_model, convert_with_torchao

    cfg = load_config(CONFIGS / "tiny.yaml", precision="torchao")
    model = build_model(cfg.model, max_seq_len=cfg.seq_len)
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert "converted" in convert_with_torchao(model)
    for name, module in model.named_modules():
        if name in linears:
            assert isinstance(module, Float8Linear) == (not name.endswith("lm_head")), name


def launch_two_cpu_processes(tmp_path: Path, *extra: str) -> Path:
    """recipes/accelerate/cpu_2proc.yaml as a user launches it: DDP over gloo, FP8 reference."""
    root = CONFIGS.parents[1]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(root / "recipes" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port", "0",
           str(root / "recipes" / "pretrain.py"), "--config", str(CONFIGS / "tiny.yaml"),
           "--precision=fp8", *FAST, f"out_dir={tmp_path}", *extra]
    # One thread per process: two processes on two cores, no oversubscription.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "2 process(es)" in proc.stdout and "MULTI_CPU" in proc.stdout
    return Path(proc.stdout.split(" -> ")[-1].strip())


def test_two_cpu_processes_on_gloo_train_and_resume_exactly(tmp_path):
    run_dir = launch_two_cpu_processes(tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["tokens"] == 6 * 2 * 8 * 64
    check_run(run_dir, "fp8")
    check_fp8_export(run_dir)
    # Each process's open loss window must come back from the checkpoint (accelerate saves
    # registered state from the main process only).
    cut = launch_two_cpu_processes(tmp_path, "run_name=cut", "stop_after_steps=5")
    shutil.rmtree(cut / "checkpoints" / "step_000005")
    launch_two_cpu_processes(tmp_path, "run_name=cut", "--resume")
    key = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens")
    assert [{k: r.get(k) for k in key} for r in read_jsonl(cut / "metrics.jsonl")] == \
        [{k: r.get(k) for k in key} for r in read_jsonl(run_dir / "metrics.jsonl")]


def test_data_flag_trains_on_a_given_folder(tmp_path):
    import hashlib

    text_dir = tmp_path / "text"
    text_dir.mkdir()
    body = "".join(f"def f{i}(x):\n    return x * {i}\n" for i in range(400)).encode()
    (text_dir / "a.py").write_bytes(body)
    run_dir = train(tmp_path, "tiny", "--precision=bf16", f"--data={text_dir}", "max_steps=2",
                    "warmup_steps=1", "data_max_bytes=0")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data_digest"] == hashlib.sha256(body).hexdigest()[:16]
    assert f"data: {text_dir}" in (run_dir / "config.yaml").read_text()


@pytest.mark.gpu
@pytest.mark.parametrize("config", ["tiny", "tiny-moe"])
def test_fp8_recipe_trains_on_the_gpu(tmp_path, config):
    """The main job on the GPU (the CPU tests above cover resume exactness; on a GPU the
    attention backward is not bitwise deterministic): loss falls, checkpoints and the FP8
    export are written, and the native cast kernels ran."""
    from fp8train.quant import native as native_casts

    full = train(tmp_path, config, "--precision=fp8")
    check_run(full, "fp8")
    check_fp8_export(full, "layers.0.mlp.experts_gate_up.weight" if config == "tiny-moe"
                     else "layers.0.mlp.w1.weight")
    # `auto` ran the native kernels, not a silent fallback to the reference emulation.
    assert native_casts._kernel.cache_info().currsize > 0
    assert json.loads((full / "summary.json").read_text())["device"].startswith("cuda")
