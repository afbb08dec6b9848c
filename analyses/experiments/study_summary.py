"""The study's summary: the measured value of each of the paper's claims, from the store.

`summarize(store, size_name, size)` reads the stored results of a study
(`ckpt_tools.analyses.experiments.study`) and measures every claim, means with 95%
Student t intervals over seeds and differences paired by seed with exact sign-flip tests;
`render(summary)` turns it into the Markdown table of ``docs/reproduction.md``. Both are
pure functions of what they are given (the store, the summary).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

__all__ = ["render", "summarize"]


def _ci(values) -> dict:
    from ckpt_tools.analyses.stats import mean_ci

    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    ci = mean_ci(values)
    return {"mean": float(ci.mean), "low": float(ci.low), "high": float(ci.high), "n": ci.n,
            "interval": ci.method, "values": [float(v) for v in values]}


def _diff(a, b) -> dict:
    """Mean of a - b with its interval; a and b are paired by seed."""
    from ckpt_tools.analyses.stats import paired_test

    out = _ci(np.asarray(a, float) - np.asarray(b, float))
    out["pvalue"] = float(paired_test(np.asarray(a, float), np.asarray(b, float)).pvalue)
    return out


def _recovered(values, rewind_0, rewind_k) -> float | None:
    """The share of rewinding's benefit a condition keeps (1: all, 0: none).

    ``(mean(values) - mean(rewind_0)) / (mean(rewind_k) - mean(rewind_0))``; None where
    rewinding to k does not beat rewinding to 0 beyond the seeds' spread (the gap's 95%
    interval reaches 0).
    """
    gap = _ci(np.asarray(rewind_k, float) - np.asarray(rewind_0, float))
    if not gap["low"] > 0:
        return None
    return float((np.nanmean(values) - np.nanmean(rewind_0)) / gap["mean"])


def _windows(series, steps, edges) -> list[float]:
    means = []
    lo = 0
    for hi in (*edges, int(steps[-1])):
        sel = (steps > lo) & (steps <= hi)
        means.append(float(np.nanmean(series[sel])))
        lo = hi
    return means


def _start_changes(store: Path, conditions, k: int, level: int, seeds) -> dict[str, list]:
    """How far an ablation moved the start of the run from plain rewinding.

    ``|w' - m * w_k| / |m * w_k|`` over the prunable weights at step k, per condition and
    seed (m: the run's mask, w': its start, read from the ablated run's stored step k).
    """
    import ckpt_tools
    from ckpt_tools.analyses.experiments.ablate import ablation_group
    from ckpt_tools.analyses.experiments.pruning import param_table

    prunable = [spec.name for spec in param_table(store) if spec.prunable]
    rewind = ckpt_tools.load_state_dict(store, k, group="train")
    out: dict[str, list] = {}
    for condition in conditions:
        out[condition] = []
        for seed in seeds:
            group = ablation_group(condition, k, level, seed)
            start = ckpt_tools.load_state_dict(store, k, group=group)
            diff = norm = 0.0
            for name in prunable:
                w_k = rewind[name] * (start[name] != 0)
                diff += float(((start[name] - w_k) ** 2).sum())
                norm += float((w_k**2).sum())
            out[condition].append(math.sqrt(diff / norm))
    return out


def summarize(store: str | Path, size_name: str, size: dict) -> dict:
    """The measured value of each claim, from the study's store alone.

    Args:
        store: The study's store (``OUT/study.zarr``).
        size_name: The key of `study.SIZES` it was run at (recorded in the summary).
        size: That size.

    Raises:
        StoreError: a result the summary needs is not stored.
        KeyError: the store was run at another size.
    """
    from ckpt_tools.analyses.experiments.ablate import read_ablation_summary
    from ckpt_tools.analyses.experiments.imp import read_summary
    from ckpt_tools.analyses.experiments.pretrain import read_pretrain_summary
    from ckpt_tools.analyses.experiments.study import PERMUTATION_RMS
    from ckpt_tools.store import read_result

    store = Path(store)
    level, early, late = size["levels"], size["early"], size["late"]
    tele = read_result(store, "telemetry").load()
    steps = tele["step"].values
    flips = tele["sign_flips_per_step"].values
    grad = tele["grad_norm"].values
    edges = size["phases"]
    bounds = zip((0, *edges), (*edges, int(steps[-1])), strict=True)
    phases = {
        "windows": [f"({a}, {b}]" for a, b in bounds],
        "sign_flips_per_step": _windows(flips, steps, edges),
        "grad_norm": _windows(grad, steps, edges),
        "grad_norm_peak_step": int(steps[int(np.nanargmax(grad))]),
        "sign_change_fraction_at": {
            str(s): float(tele["sign_change_fraction"].sel(step=s).values)
            for s in (*edges, int(steps[-1]))
        },
    }

    imp = read_summary(store)
    acc = imp["test_accuracy"]
    top = acc.sel(level=level)
    rewinding = {
        "remaining": float(imp["remaining"].sel(level=level).mean()),
        "dense_test_accuracy": float(imp.attrs["dense_test_accuracy"]),
        "accuracy": {str(k): _ci(top.sel(rewind_step=k).values) for k in size["rewinds"]},
        "by_level": {
            str(k): {str(int(n)): _ci(acc.sel(rewind_step=k, level=n).values)
                     for n in imp["level"].values}
            for k in size["rewinds"]
        },
    }
    for k in (early, late):
        rewinding[f"k{k}_minus_k0"] = _diff(top.sel(rewind_step=k).values,
                                            top.sel(rewind_step=0).values)

    abl = read_ablation_summary(store)
    alpha = f"noise_alpha_{round(PERMUTATION_RMS, 3):g}"
    ablations = {}
    for k in (early, late):
        ref = top.sel(rewind_step=k).values
        zero = top.sel(rewind_step=0).values
        row = {"rewind_k": _ci(ref), "rewind_0": _ci(zero)}
        for kind in abl["kind"].values:
            vals = abl["test_accuracy"].sel(kind=kind, rewind_step=k, level=level).values
            name = str(kind)
            row[name] = _ci(vals)
            row[f"{name}_minus_rewind_k"] = _diff(vals, ref)
            row[f"{name}_recovered"] = _recovered(vals, zero, ref)
        if alpha in row and "permute_layer" in row:
            row["noise_minus_permute_layer"] = _diff(row[alpha]["values"],
                                                     row["permute_layer"]["values"])
        changes = _start_changes(store, [str(c) for c in abl["kind"].values], k, level,
                                 [int(seed) for seed in abl["seed"].values])
        row["start_change"] = {kind: _ci(values) for kind, values in changes.items()}
        ablations[str(k)] = row
    ablations["noise_condition"] = alpha

    pre = read_pretrain_summary(store)
    n = size["pretrain_steps"]
    pseeds = [int(s) for s in size["pretrain_seeds"].split(",")]
    same = n if n in size["rewinds"] else early  # labelled updates of the recorded run
    pretraining = {"steps": n, "seeds": pseeds, "compared_rewind": same}
    ref0 = top.sel(rewind_step=0, seed=pseeds).values
    refk = top.sel(rewind_step=same, seed=pseeds).values
    for task in pre["task"].values:
        vals = pre["test_accuracy"].sel(task=task, pretrain_steps=n, level=level,
                                        seed=pseeds).values
        pretraining[str(task)] = {
            "accuracy": _ci(vals),
            "minus_rewind_0": _diff(vals, ref0),
            "minus_rewind_k": _diff(vals, refk),
            "recovered": _recovered(vals, ref0, refk),
            "pretext_accuracy": _ci(pre["pretext_accuracy"].sel(
                task=task, pretrain_steps=n, seed=pseeds).values),
        }
    pretraining["rewind_0"] = _ci(ref0)
    pretraining["rewind_k"] = _ci(refk)
    return {"size": size_name, "store": str(store), "sub_phases": phases,
            "rewinding": rewinding, "ablations": ablations, "pretraining": pretraining}


def _fmt(ci: dict, pct: bool = True) -> str:
    scale, unit = (100, " pp") if pct else (1, "")
    return (f"{ci['mean'] * scale:+.2f}{unit} [{ci['low'] * scale:+.2f}, "
            f"{ci['high'] * scale:+.2f}]")


def _acc(ci: dict) -> str:
    return f"{ci['mean']:.2%} [{ci['low']:.2%}, {ci['high']:.2%}]"


def _frac(value: float | None) -> str:
    return "n/a (no gap to recover)" if value is None else f"{value:.2f}"


def _change(ci: dict) -> str:
    return f"{ci['mean']:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]"


def render(summary: dict) -> str:
    """The measured side of each claim as a Markdown table.

    Means with 95% Student t intervals over seeds (accuracy differences in percentage
    points, p from an exact sign-flip test of the differences paired by seed).
    """
    ph, rw, ab, pre = (summary[k] for k in ("sub_phases", "rewinding", "ablations",
                                            "pretraining"))
    ks = sorted(int(k) for k in rw["accuracy"])
    early, late = ks[1], ks[-1]
    lines = ["| claim | measured |", "|---|---|"]
    flips = ", ".join(f"{w}: {v:.2e}" for w, v in zip(ph["windows"], ph["sign_flips_per_step"],
                                                       strict=True))
    grads = ", ".join(f"{w}: {v:.3g}" for w, v in zip(ph["windows"], ph["grad_norm"],
                                                       strict=True))
    lines.append(f"| sub-phases: sign flips per update | {flips} |")
    lines.append(f"| sub-phases: gradient norm | {grads}; peak at step "
                 f"{ph['grad_norm_peak_step']} |")
    accs = "; ".join(f"k={k}: {_acc(rw['accuracy'][str(k)])}" for k in ks)
    lines.append(f"| IMP at {rw['remaining']:.2%} of weights (dense "
                 f"{rw['dense_test_accuracy']:.2%}) | {accs} |")
    for k in (early, late):
        d = rw[f"k{k}_minus_k0"]
        lines.append(f"| rewind to {k} minus rewind to 0 | {_fmt(d)}, p = {d['pvalue']:.2f} |")
    for k in (early, late):
        row = ab[str(k)]
        for kind in [c for c in row if c + "_minus_rewind_k" in row]:
            d = row[f"{kind}_minus_rewind_k"]
            lines.append(
                f"| {kind} at k={k} minus rewinding to {k} | {_fmt(d)}, p = {d['pvalue']:.2f}; "
                f"recovered {_frac(row[f'{kind}_recovered'])}; start moved "
                f"{_change(row['start_change'][kind])} of w_k |")
    for k in (early, late):
        if "noise_minus_permute_layer" in ab[str(k)]:
            d = ab[str(k)]["noise_minus_permute_layer"]
            lines.append(f"| {ab['noise_condition']} minus permute_layer at k={k} | {_fmt(d)}, "
                         f"p = {d['pvalue']:.2f} |")
    n, same = pre["steps"], pre["compared_rewind"]
    for task in [t for t in pre if isinstance(pre[t], dict) and "recovered" in pre[t]]:
        t = pre[task]
        lines.append(
            f"| pre-training {task}, {n} updates | {_acc(t['accuracy'])}; minus rewind to 0: "
            f"{_fmt(t['minus_rewind_0'])}; minus rewind to {same}: {_fmt(t['minus_rewind_k'])}"
            f"; recovered {_frac(t['recovered'])}; pretext accuracy "
            f"{_acc(t['pretext_accuracy'])} |")
    return "\n".join(lines) + "\n"


