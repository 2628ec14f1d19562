"""The typed training config: one frozen dataclass per concern, a comment above each field.

A run's config is built in three layers, later ones winning:
  1. the defaults below,
  2. a small YAML override file (``recipes/configs/<name>.yaml``; the ``model:`` section
     overrides ``ModelConfig``),
  3. ``key=value`` command-line overrides (``lr=1e-3``, ``model.dim=256``), values parsed as
     YAML scalars.
Unknown keys are errors at every layer (nanoGPT's rule, but checked before anything runs),
and every value is checked against its field's type. The resolved config is written as YAML
into the run folder and into each checkpoint.
"""
from __future__ import annotations

import dataclasses
import difflib
import inspect
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fp8train import FP8Recipe

PRECISIONS = ("fp8", "bf16", "torchao")  # torchao: its float8 tensorwise training, the anchor

# Fields that may differ between a run and its resume: they steer the process, not the
# numbers (changing max_steps, lr or the data would silently change the curve being resumed).
RUN_CONTROL_KEYS = frozenset({"stop_after_steps", "progress_bar", "log_with", "keep_checkpoints",
                              "max_skipped_steps"})


class ConfigError(ValueError):
    """A config file or override names an unknown key or holds a bad value."""


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-style decoder: RMSNorm, rotary attention, SwiGLU MLP or MoE, untied head."""

    # Tokens in the vocabulary; 256 = raw bytes (the recipes' byte-level tokenizer).
    vocab_size: int = 256
    # Model width. Linear layers convert to FP8 only when their dims are multiples of 128.
    dim: int = 128
    # Decoder blocks.
    n_layers: int = 2
    # Query heads; head_dim = dim / n_heads (must be even for rotary embeddings).
    n_heads: int = 4
    # Key/value heads for grouped-query attention; 0 = n_heads (plain multi-head attention).
    n_kv_heads: int = 0
    # Hidden width of the SwiGLU MLP in dense blocks.
    ffn_dim: int = 384
    # Base of the rotary embedding frequencies.
    rope_theta: float = 10000.0
    # RMSNorm epsilon.
    norm_eps: float = 1e-5
    # Std of the normal init; output projections get it scaled by 1/sqrt(2 * n_layers).
    init_std: float = 0.02
    # Routed experts per MoE block; 0 = every block is dense.
    n_experts: int = 0
    # Experts each token is routed to (softmax top-k router).
    moe_top_k: int = 2
    # Hidden width of each expert's SwiGLU; 0 = ffn_dim.
    moe_ffn_dim: int = 0
    # Hidden width of an always-on shared SwiGLU expert (DeepSeek-style) beside the routed
    # ones; 0 = none.
    moe_shared_dim: int = 0
    # The first this-many blocks stay dense (DeepSeek-V3 keeps its first 3 dense).
    moe_first_dense_layers: int = 0
    # A transformers architecture to train instead of the decoder above: its model_type
    # ("llama", "qwen3_moe", "mixtral", "deepseek_v3", ...), built with
    # AutoModelForCausalLM.from_config (never downloaded). The fields above are then unused
    # except vocab_size; every key of the ``model:`` section that is not a field here goes
    # into hf_config (``model: {hf: qwen3_moe, hidden_size: 1024, num_experts: 16}``).
    hf: str = ""
    # Keyword arguments of that architecture's config; checked against its defaults.
    hf_config: dict = field(default_factory=dict)

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def expert_dim(self) -> int:
        return self.moe_ffn_dim or self.ffn_dim

    def __post_init__(self):
        _require(not self.hf_config or bool(self.hf),
                 f"model.hf_config={self.hf_config} needs model.hf (a transformers model_type)")
        if self.hf:
            _check_hf_config(self.hf, self.hf_config)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim"):
            _require(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("n_kv_heads", "n_experts", "moe_ffn_dim", "moe_shared_dim",
                     "moe_first_dense_layers"):
            _require(getattr(self, name) >= 0, f"model.{name} must be >= 0, got {getattr(self, name)}")
        _require(self.dim % self.n_heads == 0,
                 f"model.dim={self.dim} is not divisible by model.n_heads={self.n_heads}")
        _require(self.head_dim % 2 == 0,
                 f"head_dim = dim / n_heads = {self.head_dim} must be even for rotary embeddings")
        _require(self.n_heads % self.kv_heads == 0,
                 f"model.n_heads={self.n_heads} is not a multiple of model.n_kv_heads={self.kv_heads}")
        _require(self.rope_theta > 0 and self.norm_eps > 0 and self.init_std > 0,
                 "model.rope_theta, model.norm_eps and model.init_std must be > 0")
        if self.n_experts:
            _require(1 <= self.moe_top_k <= self.n_experts,
                     f"model.moe_top_k={self.moe_top_k} must be in [1, n_experts={self.n_experts}]")
            _require(self.moe_first_dense_layers < self.n_layers,
                     f"model.moe_first_dense_layers={self.moe_first_dense_layers} leaves no MoE "
                     f"block among n_layers={self.n_layers}; set model.n_experts=0 for a dense model")

    def linear_dims(self) -> dict[str, int]:
        """The dims of every linear layer that FP8 conversion should cover, by name."""
        if self.hf:  # the usual transformers names of the widths its linears take
            return {f"hf_config.{k}": v for k, v in self.hf_config.items()
                    if k in ("hidden_size", "intermediate_size", "moe_intermediate_size")}
        dims = {"dim": self.dim, "n_heads * head_dim": self.n_heads * self.head_dim,
                "kv_heads * head_dim": self.kv_heads * self.head_dim}
        if self.n_experts == 0 or self.moe_first_dense_layers > 0:
            dims["ffn_dim"] = self.ffn_dim
        if self.n_experts:
            dims["moe_ffn_dim (or ffn_dim)"] = self.expert_dim
            if self.moe_shared_dim:
                dims["moe_shared_dim"] = self.moe_shared_dim
        return dims


@dataclass(frozen=True)
class TrainConfig:
    """Everything a run needs besides the launcher's (accelerate's) own settings."""

    # The model's shape; the YAML ``model:`` section and ``model.<key>=`` overrides.
    model: ModelConfig = field(default_factory=ModelConfig)
    # fp8: convert eligible linears with fp8train.convert_to_fp8; bf16: leave them in BF16;
    # torchao: torchao's float8 tensorwise training on every linear but the head (dense
    # models; needs torchao installed). All run under Accelerator(mixed_precision="bf16")
    # with FP32 master weights.
    precision: str = "fp8"
    # Text file or folder to train on; empty = the Python standard library's own sources.
    data: str = ""
    # Read at most this many bytes of the corpus (keeps start-up quick); 0 = all of it.
    data_max_bytes: int = 4_000_000
    # The last this fraction of the corpus is the validation split.
    val_fraction: float = 0.05
    # Seeds the weights' init and every batch; two runs with one seed see the same batches.
    seed: int = 1337
    # Seeds the weights' init alone when >= 0 (the batches still follow `seed`): two runs
    # that differ only here measure the run-to-run loss noise a precision comparison sits in.
    init_seed: int = -1
    # Tokens per sequence (also the length the rotary tables are built for).
    seq_len: int = 128
    # Sequences per process per micro-step.
    micro_batch_size: int = 16
    # Micro-steps per optimizer step (gradients summed, synced on the last one).
    grad_accum_steps: int = 1
    # Optimizer steps in the whole run; the LR schedule is laid out over these.
    max_steps: int = 200
    # Steps of linear LR warm-up from 0 to lr.
    warmup_steps: int = 20
    # Peak learning rate (AdamW).
    lr: float = 3e-3
    # Learning rate at the end of the cosine decay.
    min_lr: float = 3e-4
    # AdamW decoupled weight decay, applied to matrices only (not norms).
    weight_decay: float = 0.1
    # AdamW betas and epsilon.
    beta1: float = 0.9
    beta2: float = 0.95
    adam_eps: float = 1e-8
    # Clip the global gradient norm to this; 0 = no clipping.
    grad_clip: float = 1.0
    # Log a train record (loss, lr, grad norm, tokens/s, memory) every this many steps.
    log_interval: int = 10
    # Measure the validation loss every this many steps (and at the end).
    eval_interval: int = 50
    # Batches averaged for each validation loss (always the same batches).
    eval_batches: int = 8
    # Save a checkpoint (accelerator.save_state) every this many steps (and at the end).
    checkpoint_interval: int = 100
    # Keep only the newest this-many checkpoints; 0 = keep all.
    keep_checkpoints: int = 2
    # A step whose loss or gradient norm is not finite is skipped (no weight update, logged);
    # this many in a row stop the run.
    max_skipped_steps: int = 3
    # Runs go to <out_dir>/<run_name>/.
    out_dir: str = "runs"
    # Run folder name; empty = "<config file stem>-<precision>".
    run_name: str = ""
    # Stop (with a checkpoint) after this many steps without changing the schedule, to split a
    # run over several jobs; continue it with --resume. 0 = run to max_steps.
    stop_after_steps: int = 0
    # torch.compile the model (compare FP8 and BF16 only under the same setting).
    compile: bool = False
    # The FP8 recipe of every converted layer (fp8train.FP8Recipe), for ablations of the loss
    # gap: scales rounded up to powers of two, and which of the three GEMMs run in FP8 (a
    # GEMM not in FP8 runs in BF16 from the same layer). Needs precision=fp8.
    fp8_pow2_scale: bool = FP8Recipe.pow2_scale
    fp8_fprop: bool = FP8Recipe.fprop_fp8
    fp8_dgrad: bool = FP8Recipe.dgrad_fp8
    fp8_wgrad: bool = FP8Recipe.wgrad_fp8
    # FSDP2 launches only (recipes/accelerate/fsdp2.yaml): all-gather the FP8Linear and MoE
    # expert weights as e4m3 + 128x128 scales (half the bytes of BF16) instead of BF16. A linear
    # whose out_features is not a multiple of 128 x processes (experts: num_experts not a
    # multiple of processes) keeps the BF16 gather. Needs precision=fp8.
    fp8_all_gather: bool = False
    # Trackers for accelerator.log besides the JSONL file, e.g. "tensorboard" or "wandb".
    log_with: str = ""
    # Show a tqdm progress bar on the main process.
    progress_bar: bool = True

    def __post_init__(self):
        _require(self.precision in PRECISIONS,
                 f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("seq_len", "micro_batch_size", "grad_accum_steps", "max_steps",
                     "log_interval", "eval_interval", "eval_batches", "checkpoint_interval",
                     "max_skipped_steps"):
            _require(getattr(self, name) > 0, f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("data_max_bytes", "warmup_steps", "keep_checkpoints", "stop_after_steps",
                     "weight_decay", "grad_clip", "min_lr"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        _require(self.init_seed >= -1, f"init_seed must be >= 0 (or -1: use seed), got {self.init_seed}")
        _require(0 < self.val_fraction < 1, f"val_fraction must be in (0, 1), got {self.val_fraction}")
        _require(self.lr > 0 and self.min_lr <= self.lr,
                 f"need 0 < lr and min_lr <= lr, got lr={self.lr}, min_lr={self.min_lr}")
        _require(self.warmup_steps <= self.max_steps,
                 f"warmup_steps={self.warmup_steps} exceeds max_steps={self.max_steps}")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1 and self.adam_eps > 0,
                 "need 0 <= beta1, beta2 < 1 and adam_eps > 0")
        if self.precision == "fp8":
            # A dim that is not a multiple of 128 leaves its linears in BF16 (the 128x128 weight
            # blocks), so an "fp8" run would quietly be part BF16: refuse it here instead.
            bad = {k: v for k, v in self.model.linear_dims().items() if v % 128}
            _require(not bad, f"precision=fp8 needs every linear dim to be a multiple of 128 "
                              f"(the FP8 block size); these are not: {bad}")
        if self.precision == "torchao":
            # The anchor fp8train races: torchao's tensorwise float8 on the same dense model.
            # Its FP8 MoE training needs expert token counts padded to 16, which neither these
            # models nor transformers' experts provide (bench hf keeps its experts in BF16).
            _require(not self.model.hf and self.model.n_experts == 0,
                     "precision=torchao converts dense recipe models only (n_experts=0, not an HF "
                     "model); `python -m benchmarks hf` has a torchao row for the HF MoE model "
                     "(experts in BF16)")
            bad = {k: v for k, v in self.model.linear_dims().items() if v % 16}
            _require(not bad, f"precision=torchao needs every linear dim to be a multiple of 16 "
                              f"(torchao's float8 GEMMs); these are not: {bad}")
        _require(self.precision == "fp8" or self.fp8_recipe() == FP8Recipe(),
                 "fp8_pow2_scale / fp8_fprop / fp8_dgrad / fp8_wgrad need precision=fp8")
        _require(not self.fp8_all_gather or self.precision == "fp8",
                 "fp8_all_gather=true needs precision=fp8 (only FP8Linear weights have an FP8 copy)")

    def model_seed(self) -> int:
        """The seed the weights' init runs under: init_seed if set, else seed."""
        return self.init_seed if self.init_seed >= 0 else self.seed

    def fp8_recipe(self) -> FP8Recipe:
        """The fp8train.FP8Recipe the run's layers are converted with."""
        return FP8Recipe(pow2_scale=self.fp8_pow2_scale, fprop_fp8=self.fp8_fprop,
                         dgrad_fp8=self.fp8_dgrad, wgrad_fp8=self.fp8_wgrad)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _check_hf_config(model_type: str, hf_config: dict) -> None:
    """Unknown architectures and config keys are errors here, before anything runs
    (transformers itself would keep a misspelt key as a silent extra attribute)."""
    try:
        from transformers import AutoConfig
    except ImportError as e:
        raise ConfigError("model.hf needs transformers: pip install -e '.[hf]'") from e
    try:
        defaults = AutoConfig.for_model(model_type)
    except ValueError as e:
        raise ConfigError(f"model.hf={model_type!r} is not a transformers model_type") from e
    # Some keys are read by the modeling code only (getattr(config, "head_dim", ...)), so a
    # key is known when the config has it or the modeling module's source names it.
    from transformers import AutoModelForCausalLM

    model_class = AutoModelForCausalLM._model_mapping.get(type(defaults), None)
    source = inspect.getsource(sys.modules[model_class.__module__]) if model_class else ""
    unknown = sorted(k for k in hf_config
                     if not hasattr(defaults, k) and not re.search(rf"\b{re.escape(k)}\b", source))
    _require(not unknown, f"model: {unknown} are neither fields of ModelConfig nor keys of "
                          f"transformers' {type(defaults).__name__}")


def load_config(path: str | Path | None, overrides: list[str] = (), **cli: Any) -> TrainConfig:
    """Defaults <- YAML file at ``path`` <- ``key=value`` overrides <- ``cli`` (non-None only).

    The run name defaults to ``<file stem>-<precision>``.
    """
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        loaded = yaml.safe_load(path.read_text()) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of keys to values, got {type(loaded).__name__}")
        _merge(values, loaded, TrainConfig, source=str(path))
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key=value (e.g. lr=1e-3, model.dim=256)")
        _merge(values, _nest(key.strip(), yaml.safe_load(raw) if raw.strip() else ""),
               TrainConfig, source=f"override {item!r}")
    _merge(values, {k: v for k, v in cli.items() if v is not None}, TrainConfig, source="command line")
    cfg = _build(TrainConfig, values, prefix="")
    if not cfg.run_name:
        stem = path.stem if path is not None else "default"
        cfg = dataclasses.replace(cfg, run_name=f"{stem}-{cfg.precision}")
    return cfg


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """Rebuild a resolved config (e.g. one saved in a run folder), with the same checks."""
    merged: dict[str, Any] = {}
    _merge(merged, values, TrainConfig, source="saved config")
    return _build(TrainConfig, merged, prefix="")


def config_diff(a: TrainConfig, b: TrainConfig, ignore=RUN_CONTROL_KEYS) -> dict[str, tuple]:
    """Flattened keys whose values differ between two configs: {key: (a_value, b_value)}."""
    fa, fb = _flatten(a.to_dict()), _flatten(b.to_dict())
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if k not in ignore and fa.get(k) != fb.get(k)}


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _nest(dotted: str, value: Any) -> dict[str, Any]:
    head, _, rest = dotted.partition(".")
    return {head: _nest(rest, value) if rest else value}


def _merge(into: dict, new: dict, cls: type, source: str, prefix: str = "") -> None:
    """Merge ``new`` into ``into``, rejecting keys that are not fields of ``cls``."""
    hints = typing.get_type_hints(cls)
    for key, value in new.items():
        if key not in hints and cls is ModelConfig and (new.get("hf") or into.get("hf")):
            # A transformers architecture's own keys (checked in ModelConfig.__post_init__).
            into.setdefault("hf_config", {})[key] = value
            continue
        if key not in hints:
            close = difflib.get_close_matches(str(key), list(hints), n=1)
            hint = f"; did you mean {prefix}{close[0]!r}?" if close else ""
            raise ConfigError(f"{source}: unknown key {prefix}{key!r}{hint} "
                              f"(known keys: {', '.join(prefix + k for k in hints)})")
        if dataclasses.is_dataclass(hints[key]):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {prefix}{key} must be a mapping, got {value!r}")
            _merge(into.setdefault(key, {}), value, hints[key], source, prefix=f"{prefix}{key}.")
        else:
            into[key] = value


def _build(cls: type, values: dict[str, Any], prefix: str):
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = _build(kind, value, prefix=f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: type, name: str) -> Any:
    """Check ``value`` against a field type; ints widen to floats, scalars become strings."""
    if kind in (int, float) and isinstance(value, str):
        # PyYAML reads "3e-4" (no dot) as a string: parse numbers in Python's own syntax.
        try:
            value = kind(value)
        except ValueError:
            pass
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif kind is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif kind is str:
        ok = value is None or isinstance(value, (str, int, float))
        value = "" if value is None else str(value)
    elif kind is dict:
        ok = isinstance(value, dict)
    else:  # pragma: no cover - a field type this loader does not know is a bug here
        raise TypeError(f"config field {name} has unsupported type {kind}")
    if not ok:
        article = "an" if kind.__name__[0] in "aeiou" else "a"
        raise ConfigError(f"{name} must be {article} {kind.__name__}, got {value!r} "
                          f"({type(value).__name__})")
    return value
