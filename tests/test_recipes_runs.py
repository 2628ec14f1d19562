"""Runs that lose no work (CPU, tiny config): divergence is never checkpointed, a crash or a
full disk mid-save leaves the earlier checkpoints alone, nothing is unpickled on --resume,
a folder holding a run is never clobbered, and compare.py compares only comparable runs."""
import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from recipes import checkpoint, compare
from recipes.metrics import read_jsonl
from test_recipes_train import losses, train


def all_finite(run_dir: Path) -> bool:
    files = sorted((run_dir / "checkpoints").glob("step_*/model.safetensors"))
    assert files
    return all(bool(torch.isfinite(t).all()) for f in files for t in load_file(f).values())


def test_diverging_run_stops_naming_the_step_and_checkpoints_only_finite_weights(tmp_path):
    with pytest.raises(SystemExit, match=r"step \d+: .*max_skipped_steps=3 reached.*diverged"):
        train(tmp_path, "tiny", "--precision=bf16", "lr=1e4", "min_lr=1", "grad_clip=0",
              "checkpoint_interval=1", "keep_checkpoints=2", "log_interval=10", "max_steps=20")
    run = tmp_path / "tiny-bf16"
    assert all_finite(run)
    skipped = [r for r in read_jsonl(run / "metrics.jsonl") if r.get("skipped")]
    assert len(skipped) == 3 and skipped[0]["first_nonfinite_grad"]


def test_an_injected_inf_gradient_skips_that_step_and_the_run_goes_on(tmp_path, monkeypatch):
    from recipes import pretrain

    original = pretrain.build_model
    calls = {"backward": 0}

    def build_with_bad_step(*args, **kwargs):
        model = original(*args, **kwargs)
        weight = model.layers[0].mlp.w1.weight

        def poison(grad):
            calls["backward"] += 1
            return grad.clone().fill_(float("inf")) if calls["backward"] == 4 else grad
        weight.register_hook(poison)
        return model

    monkeypatch.setattr(pretrain, "build_model", build_with_bad_step)
    run = train(tmp_path, "tiny", "--precision=fp8")
    records = read_jsonl(run / "metrics.jsonl")
    skipped = [r for r in records if r.get("skipped")]
    assert [r["step"] for r in skipped] == [4]
    assert skipped[0]["first_nonfinite_grad"] == "layers.0.mlp.w1.weight"
    assert sorted(losses(run)) == [1, 2, 4, 6] and all_finite(run)
    assert [r["skipped_steps"] for r in records if "loss" in r and r["loss"] is not None][-1] == 1


def test_a_failed_save_keeps_the_earlier_checkpoints_and_says_why(tmp_path, monkeypatch):
    from accelerate import Accelerator

    original = Accelerator.save_state
    saves = []

    def save_state(self, output_dir, **kwargs):
        saves.append(output_dir)
        if len(saves) == 2:  # the second checkpoint: half written, then the disk fills up
            original(self, output_dir, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    with pytest.raises(SystemExit, match=r"checkpoint .*step_000006 was not saved \(the disk is full\)"):
        train(tmp_path, "tiny", "--precision=bf16")
    ckpts = tmp_path / "tiny-bf16" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_000003"]  # no partial folder
    monkeypatch.setattr(Accelerator, "save_state", original)
    run = train(tmp_path, "tiny", "--precision=bf16", "--resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000003", "step_000006"]


def test_resume_unpickles_nothing(tmp_path):
    run = train(tmp_path, "tiny", "--precision=bf16", "stop_after_steps=3")
    ckpt = run / "checkpoints" / "step_000003"
    assert (ckpt / "train_state.json").is_file() and not list(ckpt.glob("custom_checkpoint*"))
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    (ckpt / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(SystemExit, match=r"custom_checkpoint_0.pkl.*not loaded"):
        train(tmp_path, "tiny", "--precision=bf16", "--resume")
    assert not marker.exists()


def test_a_folder_holding_a_run_is_never_clobbered(tmp_path):
    run = train(tmp_path, "tiny", "--precision=bf16", "stop_after_steps=3")
    metrics_before = (run / "metrics.jsonl").read_bytes()
    config_before = (run / "config.yaml").read_bytes()
    with pytest.raises(SystemExit, match=r"already holds a run \(checkpoints up to step 3\).*--resume.*--overwrite"):
        train(tmp_path, "tiny", "--precision=bf16")
    with pytest.raises(SystemExit, match=r"data error: --data .*no such file"):
        train(tmp_path, "tiny", "--precision=bf16", f"--data={tmp_path / 'missing'}", "--overwrite")
    assert (run / "metrics.jsonl").read_bytes() == metrics_before
    assert (run / "config.yaml").read_bytes() == config_before
    train(tmp_path, "tiny", "--precision=bf16", "--overwrite")
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("tiny-bf16.replaced-")]
    assert len(moved) == 1 and (moved[0] / "metrics.jsonl").read_bytes() == metrics_before
    assert (moved[0] / "checkpoints" / "step_000003").is_dir()


def test_resume_of_a_finished_run_leaves_it_alone(tmp_path, capsys):
    run = train(tmp_path, "tiny", "--precision=bf16")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    train(tmp_path, "tiny", "--precision=bf16", "--resume")
    assert "already finished (step 6 of 6)" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before


def test_pruning_keeps_other_runs_checkpoints(tmp_path):
    import shutil

    run = train(tmp_path, "tiny", "--precision=bf16", "keep_checkpoints=1", "stop_after_steps=3")
    foreign = run / "checkpoints" / "step_000001"  # as if copied in from another run
    shutil.copytree(run / "checkpoints" / "step_000003", foreign)
    state = json.loads((foreign / "train_state.json").read_text())
    (foreign / "train_state.json").write_text(json.dumps({**state, "run_id": "another-run"}))
    train(tmp_path, "tiny", "--precision=bf16", "keep_checkpoints=1", "--resume")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000001", "step_000006"]
    assert checkpoint.list_checkpoints(run, "another-run") == [(1, foreign)]


def test_more_checkpoints_than_kept_are_pruned_oldest_first(tmp_path):
    run = train(tmp_path, "tiny", "--precision=bf16", "checkpoint_interval=1", "keep_checkpoints=2")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000005", "step_000006"]


def test_truncated_checkpoint_on_resume_names_the_file(tmp_path):
    run = train(tmp_path, "tiny", "--precision=bf16", "stop_after_steps=3")
    weights = run / "checkpoints" / "step_000003" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(SystemExit, match=r"checkpoint .*step_000003 could not be read"):
        train(tmp_path, "tiny", "--precision=bf16", "--resume")


def test_compare_refuses_runs_of_different_configs(tmp_path, capsys):
    a = train(tmp_path, "tiny", "--precision=bf16", "run_name=a", "max_steps=6")
    b = train(tmp_path, "tiny", "--precision=fp8", "run_name=b", "max_steps=4", "warmup_steps=1")
    capsys.readouterr()
    assert compare.main([str(b), str(a), "--window", "2", "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err
    assert "'max_steps': (4, 6)" in err and "'warmup_steps': (1, 2)" in err and "'precision'" not in err
    assert compare.main([str(b), str(a), "--window", "2", "--out", str(tmp_path / "c"),
                         "--allow-mismatch"]) == 0
