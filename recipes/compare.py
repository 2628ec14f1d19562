"""Compare two runs of recipes/pretrain.py: loss curves in one PNG, and a table.

    python recipes/compare.py runs/small-fp8 runs/small-bf16 [--window 100] [--out DIR]
    python recipes/compare.py runs/1b-fp8 runs/1b-bf16 --min-speedup 1.3 --max-mem-ratio 1.0

RUN_A is the run under test (e.g. FP8), RUN_B the reference (BF16). Reported:
  - relative loss error |mean_A / mean_B - 1| of the training loss over the last ``window``
    steps both runs logged (DeepSeek-V3 reports < 0.25% for FP8 vs BF16), the mean
    per-step signed difference, and the signed error mean_A / mean_B - 1 of every
    ``window``-step window from the start (where a gap opens and where it closes);
  - the final validation losses;
  - tokens/s ratio A/B (steady state: the first log interval, with the warm-up, left out);
  - peak memory ratio A/B.
Writes ``compare.png`` and ``report.md`` into ``--out`` (default: ``<parent of RUN_A>/compare-<A>-vs-<B>``).
With ``--max-rel-err`` / ``--min-speedup`` / ``--max-mem-ratio`` it exits 1 when a bar is missed.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

# Run as a script: make the repository root importable (see pretrain.py).
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from recipes.metrics import read_jsonl  # noqa: E402

# Keys two compared runs may differ in: the precision (and the FP8 recipe's own switches),
# where the run lives, and what only steers the process.
COMPARABLE_KEYS = frozenset({"precision", "run_name", "out_dir", "fp8_pow2_scale", "fp8_fprop",
                             "fp8_dgrad", "fp8_wgrad", "fp8_all_gather"})


def load_run(run_dir: Path) -> dict:
    """A run's train records {step: loss}, val records, summary and config."""
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run folder: no metrics.jsonl in it")
    records = read_jsonl(metrics)
    train = {r["step"]: r for r in records if "loss" in r}
    if not train:
        raise ValueError(f"{metrics} holds no training records")
    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    return {"name": run_dir.name, "train": train,
            "val": {r["step"]: r["val_loss"] for r in records if "val_loss" in r},
            "summary": summary, "tokens_per_s": _tokens_per_s(summary, list(train.values())),
            "peak_mem_gb": summary.get("peak_mem_gb") or max(r["peak_mem_gb"] for r in train.values()),
            "mem_kind": summary.get("mem_kind") or next(iter(train.values())).get("mem_kind")}


def _tokens_per_s(summary: dict, records: list[dict]) -> float | None:
    if summary.get("tokens_per_s"):
        return summary["tokens_per_s"]
    # No summary (a run still going, or cut off): the median interval rate, first one left out.
    rates = sorted(r["tokens_per_s"] for r in records[1:] if r.get("tokens_per_s"))
    return rates[len(rates) // 2] if rates else None


def config_mismatch(dir_a: Path, dir_b: Path, a: dict, b: dict) -> dict:
    """{key: (A's value, B's value)} of every config key (and the process count) the runs
    differ in besides ``COMPARABLE_KEYS``; a run without config.yaml is a mismatch."""
    import yaml

    from recipes.config import RUN_CONTROL_KEYS, config_diff, config_from_dict

    configs = []
    for path in (dir_a, dir_b):
        file = path / "config.yaml"
        if not file.is_file():
            return {"config.yaml": f"missing in {path}"}
        configs.append(config_from_dict(yaml.safe_load(file.read_text())))
    diff = config_diff(*configs, ignore=RUN_CONTROL_KEYS | COMPARABLE_KEYS)
    procs = (a["summary"].get("processes"), b["summary"].get("processes"))
    if None not in procs and procs[0] != procs[1]:
        diff["processes"] = procs
    return diff


def compare(a: dict, b: dict, window: int) -> dict:
    """The numbers of the report; the window is the last ``window`` steps both runs logged."""
    common = sorted(set(a["train"]) & set(b["train"]))
    if not common:
        raise ValueError(f"{a['name']} and {b['name']} logged no step in common")
    last = [s for s in common if s > common[-1] - window]
    loss_a = [a["train"][s]["loss"] for s in last]
    loss_b = [b["train"][s]["loss"] for s in last]
    mean_a, mean_b = sum(loss_a) / len(loss_a), sum(loss_b) / len(loss_b)
    val_common = sorted(set(a["val"]) & set(b["val"]))
    windows = []
    for first in range(1, common[-1] + 1, window):
        steps = [s for s in common if first <= s < first + window]
        if steps:
            wa = sum(a["train"][s]["loss"] for s in steps)
            wb = sum(b["train"][s]["loss"] for s in steps)
            windows.append((steps[0], steps[-1], wa / wb - 1))
    return {
        "window": (last[0], last[-1], len(last)),
        "mean_loss": (mean_a, mean_b),
        "rel_loss_err": abs(mean_a / mean_b - 1),
        "mean_step_rel_diff": sum((x - y) / y for x, y in zip(loss_a, loss_b)) / len(last),
        "windows": windows,
        "val_loss": (a["val"][val_common[-1]], b["val"][val_common[-1]]) if val_common else None,
        "val_step": val_common[-1] if val_common else None,
        "tokens_per_s": (a["tokens_per_s"], b["tokens_per_s"]),
        "peak_mem_gb": (a["peak_mem_gb"], b["peak_mem_gb"]),
        "finite": all(math.isfinite(r["loss"]) for run in (a, b) for r in run["train"].values()),
    }


def _ratio(pair) -> float | None:
    x, y = pair
    return x / y if x is not None and y else None


def table(a: dict, b: dict, res: dict) -> str:
    """A markdown table: metric | A | B | A/B."""
    def fmt(v, spec):
        return "n/a" if v is None else format(v, spec)

    start, end, n = res["window"]
    rows = [(f"train loss, mean of steps {start}-{end} ({n} records)", res["mean_loss"], ".4f"),
            (f"val loss at step {res['val_step']}", res["val_loss"] or (None, None), ".4f"),
            ("tokens/s (steady)", res["tokens_per_s"], ",.0f"),
            (f"peak memory GB ({a['mem_kind']})", res["peak_mem_gb"], ".3f")]
    lines = [f"| metric | {a['name']} | {b['name']} | ratio |", "| --- | --- | --- | --- |"]
    for label, pair, spec in rows:
        lines.append(f"| {label} | {fmt(pair[0], spec)} | {fmt(pair[1], spec)} | {fmt(_ratio(pair), '.4f')} |")
    lines.append(f"| relative loss error over the window | {res['rel_loss_err']:.4%} | | |")
    lines.append(f"| mean per-step relative difference | {res['mean_step_rel_diff']:+.4%} | | |")
    per_window = ", ".join(f"{first}-{last}: {err:+.2%}" for first, last, err in res["windows"])
    lines.append(f"| signed error per window | {per_window} | | |")
    return "\n".join(lines)


def plot(a: dict, b: dict, path: Path) -> None:
    try:
        import matplotlib
    except ImportError as err:
        raise SystemExit("compare.py needs matplotlib: pip install -e '.[recipes]'") from err
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    for run, color in ((a, "tab:red"), (b, "tab:blue")):
        steps = sorted(run["train"])
        top.plot(steps, [run["train"][s]["loss"] for s in steps], color=color, lw=1.2,
                 label=f"{run['name']} train")
        if run["val"]:
            vs = sorted(run["val"])
            top.plot(vs, [run["val"][s] for s in vs], "o--", color=color, ms=4, lw=0.8,
                     label=f"{run['name']} val")
    top.set_ylabel("loss (nats/byte)")
    top.legend()
    top.grid(alpha=0.3)
    common = sorted(set(a["train"]) & set(b["train"]))
    bottom.plot(common, [100 * (a["train"][s]["loss"] / b["train"][s]["loss"] - 1) for s in common],
                color="k", lw=0.8)
    bottom.axhline(0, color="gray", lw=0.5)
    bottom.set_ylabel(f"{a['name']} / {b['name']} - 1 (%)")
    bottom.set_xlabel("step")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("run_a", type=Path, help="run under test, e.g. runs/small-fp8")
    p.add_argument("run_b", type=Path, help="reference run, e.g. runs/small-bf16")
    p.add_argument("--window", type=int, default=100, help="last steps for the loss error (default 100)")
    p.add_argument("--out", type=Path, help="folder for compare.png and report.md")
    p.add_argument("--max-rel-err", type=float, help="bar: relative loss error at most this (e.g. 0.0025)")
    p.add_argument("--min-speedup", type=float, help="bar: tokens/s ratio A/B at least this")
    p.add_argument("--max-mem-ratio", type=float, help="bar: peak memory ratio A/B at most this")
    p.add_argument("--allow-mismatch", action="store_true",
                   help="compare runs whose configs differ in more than the precision (listed above the table)")
    args = p.parse_args(argv)
    if args.window < 1:
        p.error(f"--window must be >= 1, got {args.window}")

    a, b = load_run(args.run_a), load_run(args.run_b)
    mismatch = config_mismatch(args.run_a, args.run_b, a, b)
    if mismatch and not args.allow_mismatch:
        print(f"compare: the runs differ in more than the precision: {mismatch}; they are not "
              "comparable (pass --allow-mismatch to compare them anyway)", file=sys.stderr)
        return 2
    if mismatch:
        print(f"mismatch (compared anyway, --allow-mismatch): {mismatch}")
    res = compare(a, b, args.window)
    out = args.out or args.run_a.parent / f"compare-{a['name']}-vs-{b['name']}"
    out.mkdir(parents=True, exist_ok=True)
    plot(a, b, out / "compare.png")

    notes = [f"configs differ (--allow-mismatch): {mismatch}"] if mismatch else []
    digests = {run["name"]: run["summary"].get("data_digest") for run in (a, b)}
    if None in digests.values():
        unknown = [name for name, digest in digests.items() if digest is None]
        notes.append(f"no summary.json (run cut short?) for {', '.join(unknown)}: whether both "
                     "runs trained on the same bytes is unknown")
    elif len(set(digests.values())) > 1:
        notes.append("the two runs did not train on the same bytes (data digests differ)")
    if not res["finite"]:
        notes.append("a run logged a non-finite loss (diverged)")
    bars = {"relative loss error": (args.max_rel_err, res["rel_loss_err"], "<="),
            "tokens/s ratio": (args.min_speedup, _ratio(res["tokens_per_s"]), ">="),
            "peak memory ratio": (args.max_mem_ratio, _ratio(res["peak_mem_gb"]), "<=")}
    failed = []
    for name, (bar, value, op) in bars.items():
        if bar is None:
            continue
        ok = value is not None and (value <= bar if op == "<=" else value >= bar)
        notes.append(f"bar {name} {op} {bar}: {'n/a' if value is None else f'{value:.4g}'} "
                     f"{'PASS' if ok else 'FAIL'}")
        failed += [] if ok else [name]

    text = table(a, b, res)
    report = [f"# {a['name']} vs {b['name']}", "", text, "", "![loss curves](compare.png)"]
    report += [""] + [f"- {n}" for n in notes] if notes else []
    (out / "report.md").write_text("\n".join(report) + "\n")
    print(text)
    for n in notes:
        print(f"note: {n}")
    print(f"wrote {out / 'compare.png'} and {out / 'report.md'}")
    return 1 if failed or not res["finite"] else 0


if __name__ == "__main__":
    sys.exit(main())
