"""Pretrain a Llama-style decoder in fine-grained FP8 (or BF16, to compare), on byte-level text.

One process (CPU, or one GPU):
    accelerate launch recipes/pretrain.py --config recipes/configs/tiny.yaml
    python recipes/pretrain.py --config recipes/configs/tiny.yaml --precision bf16 max_steps=50
Several GPUs (DDP, or FSDP2):
    accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 8 \\
        recipes/pretrain.py --config recipes/configs/1b.yaml
    accelerate launch --config_file recipes/accelerate/fsdp2.yaml recipes/pretrain.py --config recipes/configs/1b.yaml
Two CPU processes on gloo (the reference FP8 path):
    accelerate launch --config_file recipes/accelerate/cpu_2proc.yaml recipes/pretrain.py --config recipes/configs/tiny.yaml run_name=tiny-fp8-2proc
Continue a run from its latest checkpoint (a folder that holds a run is otherwise refused;
--overwrite starts over, moving the old run aside):
    accelerate launch recipes/pretrain.py --config recipes/configs/tiny.yaml --resume
A transformers architecture built from its config (model: {hf: qwen3_moe, ...}; needs the hf extra),
exported at the end as a directory AutoModelForCausalLM.from_pretrained loads (hf_fp8/):
    python recipes/pretrain.py --config recipes/configs/tiny-hf-qwen3-moe.yaml
Compare an FP8 run with its BF16 twin:
    python recipes/compare.py runs/tiny-fp8 runs/tiny-bf16

Overrides are ``key=value`` (``lr=1e-3``, ``model.dim=256``); see recipes/config.py for every key.
Everything a run writes goes to ``<out_dir>/<run_name>/``: config.yaml, metrics.jsonl,
summary.json, checkpoints/step_N/ and, for FP8 runs, model_fp8.safetensors.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path

# Run as a script, Python puts recipes/ on sys.path, not the repository root that holds the
# `recipes` package: add the root so the imports below work either way.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import yaml  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

import fp8train  # noqa: E402
from recipes.checkpoint import (CheckpointError, TrainState, latest_checkpoint, load_checkpoint,  # noqa: E402
                                move_aside, read_run_id, read_train_state, run_summary, save_checkpoint,
                                start_run_folder)
from recipes.config import PRECISIONS, ConfigError, config_diff, config_from_dict, load_config  # noqa: E402
from recipes.data import Batches, load_corpus  # noqa: E402
from recipes.metrics import MetricsLog, Throughput, peak_memory_gb  # noqa: E402
from recipes.model import TORCHAO_MISSING, build_model, convert_with_torchao  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Overrides: key=value, e.g. lr=1e-3 model.dim=256 max_steps=50")
    p.add_argument("--config", required=True, help="YAML override file, e.g. recipes/configs/tiny.yaml")
    p.add_argument("--precision", choices=PRECISIONS, help="overrides the config's precision")
    p.add_argument("--data", help="text file or folder to train on (default: the stdlib sources)")
    p.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    p.add_argument("--overwrite", action="store_true",
                   help="start over in a run folder that holds a run (the old run is moved aside, not deleted)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides")
    # Intermixed: overrides may come before or after the flags.
    return p.parse_intermixed_args(argv)


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def main(argv=None) -> Path:
    args = parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, precision=args.precision, data=args.data)
    except ConfigError as err:
        sys.exit(f"config error: {err}")
    if cfg.precision == "torchao" and importlib.util.find_spec("torchao") is None:
        sys.exit(f"config error: {TORCHAO_MISSING}")
    run_dir = Path(cfg.out_dir) / cfg.run_name

    # -- launch: FP32 master weights, BF16 autocast for every precision ------------------------
    accelerator = Accelerator(
        mixed_precision="bf16",
        # Without a CUDA GPU, say so: only then does accelerate join several processes over
        # gloo (MULTI_CPU) instead of running each as a separate single-process job.
        cpu=not torch.cuda.is_available(),
        log_with=[t.strip() for t in cfg.log_with.split(",") if t.strip()] or None,
        project_config=ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir / "trackers")))
    main_proc = accelerator.is_main_process
    if args.resume and args.overwrite:
        sys.exit("--resume and --overwrite: pick one (continue the run, or start it over)")
    # Config and data errors come out before anything in the run folder is touched.
    try:
        corpus = load_corpus(cfg.data, cfg.data_max_bytes, cfg.val_fraction, min_tokens=cfg.seq_len + 1)
    except (OSError, ValueError) as err:
        sys.exit(f"data error: {err}")
    resume_from, run_id = None, None
    held = run_summary(run_dir)
    if args.resume:
        run_id = read_run_id(run_dir)
        try:
            resume_from = latest_checkpoint(run_dir, run_id)
            saved_state = read_train_state(resume_from)
        except (FileNotFoundError, CheckpointError) as err:
            sys.exit(str(err))
        saved = config_from_dict(yaml.safe_load((resume_from / "config.yaml").read_text()))
        diff = config_diff(saved, cfg)
        if diff:
            sys.exit(f"--resume: the config differs from the one {resume_from} was saved with "
                     f"(changing these would change the curve being resumed): {diff}")
        if int(saved_state["step"]) >= cfg.max_steps:
            accelerator.print(f"--resume: {run_dir} already finished (step {saved_state['step']} of "
                              f"{cfg.max_steps}); nothing to do, its files are left as they are")
            return run_dir
        run_id = saved_state["run_id"]
    elif held is not None:
        if not args.overwrite:
            sys.exit(f"{run_dir} already holds a run ({held}): pass --resume to continue it, "
                     "or --overwrite to start over (the old run is moved aside, not deleted)")
    # Every process has looked at the folder before the main process changes it.
    accelerator.wait_for_everyone()
    if held is not None and not args.resume and main_proc:
        accelerator.print(f"--overwrite: the old run moved to {move_aside(run_dir)}")
    if main_proc:
        if run_id is None:
            run_id = start_run_folder(run_dir)
        (run_dir / "config.yaml").write_text(cfg.to_yaml())
    run_id = _broadcast_run_id(accelerator, run_id)
    accelerator.print(f"run {run_dir} | {accelerator.num_processes} process(es) on "
                      f"{accelerator.device} | {accelerator.distributed_type}")

    # -- data: byte tokens, a fixed split; each batch a function of (seed, step, rank) -----------
    batches = Batches(corpus, cfg.seq_len, cfg.micro_batch_size, cfg.seed,
                      rank=accelerator.process_index, device=accelerator.device)
    tokens_per_step = cfg.micro_batch_size * cfg.seq_len * cfg.grad_accum_steps * accelerator.num_processes
    accelerator.print(f"data: {corpus.description}; train {len(corpus.train):,} / val "
                      f"{len(corpus.val):,} tokens; {tokens_per_step:,} tokens per step")

    # -- model: the same init on every process, then FP8 conversion -----------------------------
    set_seed(cfg.model_seed())
    model = build_model(cfg.model, max_seq_len=cfg.seq_len)
    n_params = model.num_params()
    if cfg.precision == "fp8":
        accelerator.print(fp8train.convert_to_fp8(model, recipe=cfg.fp8_recipe()))
    elif cfg.precision == "torchao":
        accelerator.print(convert_with_torchao(model))
    if cfg.fp8_all_gather:
        # Wrap before accelerator.prepare (fully_shard) and before the optimizer takes the params.
        if not accelerator.is_fsdp2:
            sys.exit("config error: fp8_all_gather=true needs an FSDP2 launch (--config_file "
                     f"recipes/accelerate/fsdp2.yaml); this one is {accelerator.distributed_type.value}")
        wrapped = fp8train.nn.enable_fp8_all_gather(model, accelerator.num_processes,
                                                    skip_ineligible=True)
        accelerator.print(f"FP8 all-gather: {len(wrapped)} FP8 weights (any other gathers in BF16: "
                          f"rows or experts not divisible into {accelerator.num_processes} whole blocks)")
    accelerator.print(f"model: {n_params / 1e6:.2f}M parameters, precision {cfg.precision}")

    # -- optimizer: AdamW on the FP32 master weights; decay matrices, not norms -----------------
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.adam_eps,
        fused=accelerator.device.type == "cuda")
    # The LR schedule is lr_at(step), set by hand each step: nothing to prepare or save for it.
    model, optimizer = accelerator.prepare(model, optimizer)
    # The loop calls `forward`; `model` stays the prepared module: torch.compile's wrapper
    # prefixes every state-dict key with "_orig_mod.", which the FP8 export's fresh model
    # would reject at the very end of a compile=true run.
    forward = torch.compile(model) if cfg.compile else model
    state = TrainState(accelerator.device, rank=accelerator.process_index, run_id=run_id)
    if resume_from is not None:
        try:
            load_checkpoint(accelerator, state, resume_from)
        except CheckpointError as err:
            sys.exit(str(err))
        accelerator.print(f"resumed from {resume_from} at step {state.step}")
    config_yaml = cfg.to_yaml()
    metrics = MetricsLog(run_dir / "metrics.jsonl", main_proc, state.step if resume_from else None)
    accelerator.init_trackers(cfg.run_name, config={k: v for k, v in cfg.to_dict().items() if k != "model"}
                              | {f"model.{k}": v for k, v in cfg.to_dict()["model"].items()})

    @torch.no_grad()
    def evaluate() -> float:
        model.eval()
        losses = torch.zeros(cfg.eval_batches, device=accelerator.device)
        for i in range(cfg.eval_batches):
            _, losses[i] = forward(*batches.get("val", i))
        model.train()
        return accelerator.reduce(losses.mean(), reduction="mean").item()

    # -- train -----------------------------------------------------------------------------------
    last_step = min(cfg.max_steps, cfg.stop_after_steps or cfg.max_steps)
    bar = tqdm(total=cfg.max_steps, initial=state.step, disable=not (main_proc and cfg.progress_bar),
               dynamic_ncols=True, desc=cfg.run_name)
    speed = Throughput()
    start_time = time.perf_counter()
    record = {}
    model.train()
    while state.step < last_step:
        step = state.step  # 0-based index of the step being taken
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step_loss = torch.zeros((), device=accelerator.device)
        for micro in range(cfg.grad_accum_steps):
            x, y = batches.get("train", step, micro)
            # Gradients sync across processes only on the last micro-step.
            sync = micro == cfg.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else accelerator.no_sync(model):
                _, loss = forward(x, y)
                accelerator.backward(loss / cfg.grad_accum_steps)
            step_loss += loss.detach() / cfg.grad_accum_steps
        # The global gradient norm (clipped to grad_clip when set) and the loss, checked before
        # the weights move: one host sync a step, every process agreeing.
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
        finite = torch.isfinite(step_loss + grad_norm).float().reshape(1)
        state.step, state.tokens = step + 1, state.tokens + tokens_per_step
        done = state.step
        if accelerator.gather(finite).min().item() == 1.0:
            optimizer.step()
            state.loss_sum += step_loss
            state.loss_steps += 1
            state.consecutive_skips = 0
        else:
            skip_step(accelerator, model, state, metrics, done, step_loss, grad_norm, cfg.max_skipped_steps)
        optimizer.zero_grad(set_to_none=True)
        speed.add(tokens_per_step)
        bar.update(1)

        # Not at a stop_after_steps stop: the open window's loss sum is checkpointed instead, so
        # a resumed run writes the same records as one that never stopped.
        if (done % cfg.log_interval == 0 or done == 1 or done == cfg.max_steps) and state.loss_steps:
            # Mean over the steps since the last record and over processes (.item() syncs).
            loss_val = accelerator.reduce(state.loss_sum, reduction="mean").item() / state.loss_steps
            state.loss_sum.zero_()
            state.loss_steps = 0
            if not math.isfinite(loss_val):
                raise FloatingPointError(f"the training loss is {loss_val} at step {done}: diverged")
            mem_gb, mem_kind = peak_memory_gb(accelerator.device)
            record = {"step": done, "loss": loss_val, "lr": lr, "tokens": state.tokens,
                      "grad_norm": float(grad_norm), "skipped_steps": state.skipped_steps,
                      "tokens_per_s": speed.lap(), "peak_mem_gb": mem_gb, "mem_kind": mem_kind,
                      "time_s": time.perf_counter() - start_time}
            metrics.write(record)
            accelerator.log({k: v for k, v in record.items() if isinstance(v, (int, float))}, step=done)
            bar.set_postfix(loss=f"{loss_val:.4f}", tok_s=f"{record['tokens_per_s']:,.0f}",
                            mem=f"{mem_gb:.2f}GB")
        if done % cfg.eval_interval == 0 or done == cfg.max_steps:
            val_loss = evaluate()
            metrics.write({"step": done, "val_loss": val_loss})
            accelerator.log({"val_loss": val_loss}, step=done)
            if main_proc:
                tqdm.write(f"step {done}: val loss {val_loss:.4f}")
            speed.restart()
        if done % cfg.checkpoint_interval == 0 or done == last_step:
            if not weights_finite(accelerator, model):
                sys.exit(f"step {done}: the weights hold non-finite values; no checkpoint saved, "
                         f"the run stops (resume from the last checkpoint with a lower lr)")
            try:
                save_checkpoint(accelerator, state, run_dir, done, config_yaml, cfg.keep_checkpoints)
            except CheckpointError as err:
                sys.exit(str(err))
            speed.restart()
    bar.close()

    # -- the end: a summary for compare.py, and the FP8 export ----------------------------------
    mem_gb, mem_kind = peak_memory_gb(accelerator.device)
    summary = {"run": cfg.run_name, "precision": cfg.precision, "steps": state.step,
               "max_steps": cfg.max_steps, "params": n_params, "tokens": state.tokens,
               "processes": accelerator.num_processes, "device": str(accelerator.device),
               "tokens_per_s": speed.steady(), "peak_mem_gb": mem_gb, "mem_kind": mem_kind,
               "final_loss": record.get("loss"), "data_digest": corpus.digest,
               "wall_s": time.perf_counter() - start_time}
    if state.step == cfg.max_steps and cfg.precision == "fp8":
        summary["fp8_export"] = export_fp8(accelerator, model, cfg, run_dir)
    if main_proc:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    accelerator.print(f"done: step {state.step}/{cfg.max_steps}, loss {summary['final_loss']}, "
                      f"{summary['tokens_per_s'] or 0:,.0f} tokens/s, peak memory {mem_gb:.2f} GB "
                      f"({mem_kind}) -> {run_dir}")
    accelerator.wait_for_everyone()  # no process tears down while another still writes
    accelerator.end_training()
    if torch.distributed.is_initialized():  # gloo/NCCL threads stopped before interpreter exit
        torch.distributed.destroy_process_group()
    return run_dir


def _broadcast_run_id(accelerator, run_id):
    """The main process's run id on every process."""
    from accelerate.utils import broadcast_object_list

    ids = [run_id]
    if accelerator.num_processes > 1:
        broadcast_object_list(ids, from_process=0)
    return ids[0]


def skip_step(accelerator, model, state, metrics, done: int, step_loss, grad_norm, limit: int) -> None:
    """A step whose loss or gradients are not finite: no weight update (the caller zeroes the
    gradients), counted and logged with the first parameter whose gradient is not finite;
    ``limit`` of them in a row stop the run."""
    state.skipped_steps += 1
    state.consecutive_skips += 1
    bad = next((name for name, p in model.named_parameters()
                if p.grad is not None and not bool(torch.isfinite(p.grad).all())), None)
    where = f"first non-finite gradient: {bad}" if bad else "every gradient finite"
    message = (f"step {done}: loss {step_loss.item():.4g}, gradient norm {float(grad_norm):.4g} "
               f"({where}); step skipped, {state.consecutive_skips} in a row")
    accelerator.print(message)
    # No "loss" key: readers of the train records (compare.py) see only steps that trained.
    metrics.write({"step": done, "skipped": True, "first_nonfinite_grad": bad})
    if state.consecutive_skips >= limit:
        sys.exit(f"{message}: max_skipped_steps={limit} reached, the run stops (diverged); "
                 "its checkpoints hold only finite weights")


def weights_finite(accelerator, model) -> bool:
    """Whether every parameter is finite on every process (one host sync)."""
    tensors = [p.detach() for p in model.parameters()]
    tensors = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    norms = torch._foreach_norm([t for t in tensors if t.numel()], ord=math.inf)
    ok = torch.isfinite(torch.stack(norms)).all().float().reshape(1)
    return accelerator.gather(ok).min().item() == 1.0


def export_fp8(accelerator, model, cfg, run_dir: Path) -> str:
    """Write the final weights in the Hugging Face fine-grained FP8 format (model_fp8.safetensors).

    The full state dict is gathered (sharded under FSDP) and loaded into a fresh converted model
    on the main process, so the export sees whole weights however training was distributed.
    """
    state_dict = accelerator.get_state_dict(model)
    # A transformers model is exported as a directory AutoModelForCausalLM.from_pretrained loads.
    path = run_dir / ("hf_fp8" if cfg.model.hf else "model_fp8.safetensors")
    if accelerator.is_main_process:
        # Built on the meta device and given the state dict's own tensors: no second random
        # init of the whole model on the host, and the FP8 casts run where the weights are
        # (the GPU's native casts; a CPU copy of a 1B model took minutes of reference casts).
        with torch.device("meta"):
            fresh = build_model(cfg.model, max_seq_len=cfg.seq_len)
        fp8train.convert_to_fp8(fresh, recipe=cfg.fp8_recipe())
        fresh.load_state_dict(state_dict, assign=True)
        if cfg.model.hf:
            fp8train.save_pretrained_fp8(fresh.hf, path)
        else:
            fp8train.export_fp8_safetensors(fresh, path)
        accelerator.print(f"exported FP8 weights -> {path}")
    accelerator.wait_for_everyone()
    return str(path)


if __name__ == "__main__":
    main()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        # Every file is written and the process group destroyed. Interpreter finalisation can
        # still run a gloo group's destructor (DDP keeps a reference) while its worker threads
        # are live, which aborts the process now and then (std::terminate) after a finished
        # run; leave before finalisation instead.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
