"""The study's summary: the measured value of each of the paper's claims, from the store.

`summarize(store, size_name, size)` reads the stored results of a study
(`ckpt_tools.analyses.experiments.study`) and measures every claim; `render(summary)`
turns it into the Markdown table of ``docs/reproduction.md``. Both are pure functions of
what they are given (the store, the summary).

Every comparison says its n, its interval and how it was made:

- two conditions measured with the same seeds are paired by seed (`stats.compare`): the
  effect is the mean per-seed difference, with its Student t 95% interval, the p value of
  the exact sign-flip permutation test (which cannot go below ``2 / 2**n``: 0.0625 with 5
  pairs) and that of the paired t-test;
- a condition against the dense run is a one-sample comparison with the dense run's final
  accuracy taken as a fixed reference (it is one run: its own seed noise is not in the
  interval);
- a quantity measured once (one instability pair, the dense run's telemetry) is reported
  as measured once, without an interval.

Verdicts say no more than the interval: "above" or "below" only when it excludes 0,
otherwise "no difference detected at n = ...".
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import numpy as np
import xarray as xr

__all__ = ["render", "summarize"]

T_INTERVAL = "Student t 95%"
PAIRED = "paired by seed: exact sign-flip permutation test and paired t-test"
ONE_SAMPLE = ("one sample against the dense run's final accuracy (one run, taken as fixed): "
              "sign-flip permutation test and one-sample t-test")


def _ci(values) -> dict:
    """Mean of the finite `values`, its Student t 95% interval (None when n < 2) and n."""
    from ckpt_tools.analyses.stats import METHODS, mean_ci

    values = np.asarray(values, dtype=float).ravel()
    values = values[np.isfinite(values)]
    ci = mean_ci(values)
    ok = ci.n >= 2
    return {"mean": float(ci.mean), "low": float(ci.low) if ok else None,
            "high": float(ci.high) if ok else None, "n": ci.n,
            "interval": f"{METHODS[ci.method]} {ci.confidence:.0%}" if ok else "none (n < 2)",
            "values": [float(v) for v in values]}


def _verdict(effect: dict, above: str, below: str) -> str:
    n, low, high = effect["n"], effect["low"], effect["high"]
    if n < 2 or low is None or not math.isfinite(low):
        return f"measured once (n = {n}); no interval"
    if low > 0:
        return f"{above} (95% interval excludes 0; n = {n})"
    if high < 0:
        return f"{below} (95% interval excludes 0; n = {n})"
    return f"no difference detected at n = {n} (95% interval includes 0)"


def _paired(a: xr.DataArray, b: xr.DataArray) -> dict:
    """``a - b`` over the `seed` dimension, paired by seed (`stats.compare`)."""
    from ckpt_tools.analyses.stats import compare

    both = xr.concat([a.drop_vars([c for c in a.coords if c != "seed"]),
                      b.drop_vars([c for c in b.coords if c != "seed"])],
                     dim=xr.DataArray(["a", "b"], dims="condition"), join="outer")
    test = compare(xr.Dataset({"v": both}), "v", {"condition": "a"}, {"condition": "b"})
    ok = test.n_a >= 2 and math.isfinite(test.low)
    return {"effect": float(test.statistic), "low": test.low if ok else None,
            "high": test.high if ok else None, "n": test.n_a,
            "interval": T_INTERVAL if ok else "none",
            "method": test.design, "pvalue": float(test.pvalue),
            "t_pvalue": None if math.isnan(test.t_pvalue) else float(test.t_pvalue),
            "seeds": [int(s) for s in both["seed"].values]}


def _against(values: xr.DataArray, reference: float) -> dict:
    """``values - reference``: one sample against a fixed reference."""
    from ckpt_tools.analyses.stats import paired_test

    x = np.asarray(values.values, float)
    x = x[np.isfinite(x)]
    test = paired_test(x, np.full_like(x, reference))
    ok = x.size >= 2 and math.isfinite(test.low)
    return {"effect": float(test.statistic), "low": test.low if ok else None,
            "high": test.high if ok else None, "n": int(x.size),
            "interval": T_INTERVAL if ok else "none", "method": ONE_SAMPLE,
            "pvalue": float(test.pvalue),
            "t_pvalue": None if math.isnan(test.t_pvalue) else float(test.t_pvalue),
            "reference": float(reference)}


def _claim(name: str, effect: dict, above: str, below: str) -> dict:
    return {"claim": name, **effect, "verdict": _verdict(effect, above, below)}


def _flip_windows(steps: np.ndarray, rates: np.ndarray) -> list[dict]:
    """Mean per-update sign-flip rate over each run of equally spaced recorded steps.

    A rate is net flips between consecutive records divided by their gap, so windows with
    different gaps are not comparable (flips that reverse within a gap are not counted):
    each window keeps one gap, and says it.
    """
    gaps = np.diff(steps)
    windows, start = [], 0
    for i in range(1, gaps.size + 1):
        if i == gaps.size or gaps[i] != gaps[start]:
            lo, hi = int(steps[start]), int(steps[i])
            sel = (steps > lo) & (steps <= hi)
            windows.append({"window": f"({lo}, {hi}]", "gap": int(gaps[start]),
                            "records": int(sel.sum()),
                            "rate": float(np.nanmean(rates[sel]))})
            start = i
    return windows


def _sign_changes(store: Path, size: dict) -> dict:
    from ckpt_tools.store import read_result

    tele = read_result(store, "telemetry").load()
    steps = tele["step"].values.astype(np.int64)
    final = int(steps[-1])
    wanted = {10, 100, 1000, 10000, final, *(k for k in size["rewinds"] if k > 0)}
    fraction = tele["sign_change_fraction"]
    return {
        "source": "the dense run (measured once)",
        "fraction_vs_init": {str(s): float(fraction.sel(step=s)) for s in sorted(wanted)
                             if s in steps},
        "flip_rate_windows": _flip_windows(steps, tele["sign_flips_per_step"].values),
    }


def _instability(store: Path, rewinds) -> dict:
    from ckpt_tools.analyses.experiments.instability import read_instability

    result = read_instability(store)
    out: dict = {"units": "fraction of test error", "by_rewind": {}}
    for k in rewinds:
        if k not in result.rewind_step.values:
            continue
        cell = result.sel(rewind_step=k)
        ci = _ci(cell["barrier"].values)
        ci["pairs"] = [[int(a), int(b)] for a, b in zip(cell["seed_a"].values,
                                                        cell["seed_b"].values, strict=True)]
        ci["verdict"] = ("measured once (one pair of copies); no interval" if ci["n"] < 2
                         else f"mean over n = {ci['n']} pairs, {ci['interval']} interval")
        out["by_rewind"][str(k)] = ci
    return out


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


def _ablations(store: Path, size: dict, top: xr.DataArray, abl: xr.Dataset) -> dict:
    k, level = size["ablations"]["rewind"], size["levels"]
    ref = top.sel(rewind_step=k)
    kinds = [str(c) for c in abl["kind"].values if str(c) != "random_reinit"
             and k in abl.rewind_step.values
             and np.isfinite(abl["test_accuracy"].sel(kind=c, rewind_step=k, level=level)).any()]
    out: dict = {"rewind": k, "level": level, "claims": []}
    for kind in kinds:
        vals = abl["test_accuracy"].sel(kind=kind, rewind_step=k, level=level)
        out["claims"].append(_claim(f"{kind} at k={k} minus rewinding to {k}",
                                    _paired(vals, ref), "ablation above rewinding",
                                    "ablation below rewinding"))
    seeds = [int(s) for s in abl["seed"].values]
    changes = _start_changes(store, kinds, k, level, seeds)
    out["start_change"] = {kind: _ci(v) for kind, v in changes.items()}
    return out


def _pretraining(size: dict, top: xr.DataArray, pre: xr.Dataset) -> dict:
    n, level = size["pretrain"]["steps"], size["levels"]
    k = n if n in size["rewinds"] else max(size["rewinds"])
    out: dict = {"steps": n, "compared_rewind": k, "claims": []}
    for task in pre["task"].values:
        vals = pre["test_accuracy"].sel(task=task, pretrain_steps=n, level=level)
        for ref in (0, k):
            out["claims"].append(_claim(
                f"pre-training {task} ({n} updates) minus rewinding to {ref}",
                _paired(vals, top.sel(rewind_step=ref)), "pre-training above",
                "pre-training below"))
    return out


def summarize(store: str | Path, size_name: str, size: dict, *,
              pilot_threshold: float | None = None) -> dict:
    """The measured value of each claim, from the study's store alone.

    Args:
        store: The study's store (``OUT/study.zarr``).
        size_name: The key of `study.SIZES` it was run at (recorded in the summary).
        size: That size.
        pilot_threshold: The pilot threshold the study ran with (None: the size's).

    Returns:
        A JSON-ready dict: ``pilot``, ``dense``, ``claims`` (each with ``effect``, ``low``,
        ``high``, ``interval``, ``method``, ``pvalue``, ``t_pvalue``, ``n`` and
        ``verdict``), ``instability``, ``sign_changes`` and, where the size runs them and
        they are stored, ``ablations`` and ``pretraining``.

    Raises:
        StoreError: a result the summary needs is not stored.
        KeyError: the store was run at another size.
    """
    from ckpt_tools.analyses.experiments.ablate import read_ablation_summary
    from ckpt_tools.analyses.experiments.imp import read_summary
    from ckpt_tools.analyses.experiments.pretrain import read_pretrain_summary
    from ckpt_tools.store import StoreError

    store = Path(store)
    threshold = size["pilot_threshold"] if pilot_threshold is None else pilot_threshold
    rewinds, level = tuple(size["rewinds"]), size["levels"]
    late = rewinds[-1]
    imp = read_summary(store)
    acc = imp["test_accuracy"]
    top = acc.sel(level=level)
    dense = float(imp.attrs["dense_test_accuracy"])
    abl = read_ablation_summary(store)
    reinit = {n: abl["test_accuracy"].sel(kind="random_reinit", rewind_step=0, level=n)
              for n in range(1, level + 1)}

    instability = _instability(store, rewinds)
    pilot = instability["by_rewind"]["0"]
    claims = [
        _claim(f"IMP rewound to k={late} minus k=0", _paired(top.sel(rewind_step=late),
                                                             top.sel(rewind_step=0)),
               f"rewinding to {late} beats rewinding to 0",
               f"rewinding to {late} falls below rewinding to 0"),
        *(_claim(f"IMP k=0 minus random re-init, level {n}",
                 _paired(acc.sel(level=n, rewind_step=0), reinit[n]),
                 "the k=0 sub-network beats a random re-initialisation",
                 "the k=0 sub-network falls below a random re-initialisation")
          for n in range(1, level + 1)),
        *(_claim(f"IMP k={k} minus dense", _against(top.sel(rewind_step=k), dense),
                 f"k={k} above dense", f"k={k} below dense")
          for k in (late, 0)),
    ]
    if len(instability["by_rewind"]) == 2 and pilot["n"] >= 2:
        a, b = (xr.DataArray(instability["by_rewind"][str(k)]["values"], dims="seed",
                             coords={"seed": np.arange(pilot["n"])}) for k in (0, late))
        effect = _paired(a, b)
        effect["method"] = "paired by seed pair: sign-flip permutation test and paired t-test"
        claims.append(_claim(f"barrier at k=0 minus barrier at k={late}", effect,
                             "less stable at 0", "more stable at 0"))
    summary = {
        "size": size_name, "store": str(store),
        "methods": {"interval": T_INTERVAL, "paired": PAIRED, "one_sample": ONE_SAMPLE},
        "pilot": {"barrier": pilot["mean"], "n": pilot["n"], "threshold": threshold,
                  "passed": pilot["mean"] >= threshold},
        "dense": {"test_accuracy": dense, "n": 1},
        "remaining": {str(n): float(imp["remaining"].sel(level=n).mean())
                      for n in range(1, level + 1)},
        "accuracy": {
            **{f"k={k}": _ci(top.sel(rewind_step=k).values) for k in rewinds},
            **{f"random re-init, level {n}": _ci(reinit[n].values) for n in reinit},
        },
        "claims": claims,
        "instability": instability,
        "sign_changes": _sign_changes(store, size),
    }
    if "ablations" in size:
        summary["ablations"] = _ablations(store, size, top, abl)
    if "pretrain" in size:
        with contextlib.suppress(StoreError):  # not stored: no pre-training claims
            summary["pretraining"] = _pretraining(size, top, read_pretrain_summary(store))
    return summary


def _pp(value: float | None) -> str:
    return "-" if value is None else f"{value * 100:+.2f}"


def _p(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _row(c: dict) -> str:
    interval = "-" if c["low"] is None else f"[{_pp(c['low'])}, {_pp(c['high'])}]"
    return (f"| {c['claim']} | {_pp(c['effect'])} | {interval} | {c['n']} | "
            f"{_p(c['pvalue'])} | {_p(c['t_pvalue'])} | {c['verdict']} |")


def render(summary: dict) -> str:
    """The summary as Markdown: the claims table and the measurements behind it.

    Effects are accuracy differences in percentage points with their Student t 95%
    interval, n (seeds, or pairs of copies), the sign-flip test's p and the t-test's p.
    """
    pilot, dense = summary["pilot"], summary["dense"]
    lines = [
        f"Pilot: error barrier at k = 0 {pilot['barrier'] * 100:.2f} pp over n = {pilot['n']} "
        f"pair(s); threshold {pilot['threshold'] * 100:.2f} pp "
        f"({'passed' if pilot['passed'] else 'not passed'}).",
        "",
        f"Dense run: final test accuracy {dense['test_accuracy']:.2%} (one run). Weights "
        "remaining: " + ", ".join(f"level {n}: {r:.2%}"
                                  for n, r in summary["remaining"].items()) + ".",
        "",
        "| condition | mean test accuracy | 95% interval | n |",
        "|---|---|---|---|",
    ]
    for name, ci in summary["accuracy"].items():
        interval = "-" if ci["low"] is None else f"[{ci['low']:.2%}, {ci['high']:.2%}]"
        lines.append(f"| {name} | {ci['mean']:.2%} | {interval} | {ci['n']} |")
    claims = list(summary["claims"])
    for part in ("ablations", "pretraining"):
        claims += summary.get(part, {}).get("claims", [])
    lines += ["", "| claim | effect (pp) | 95% interval (Student t) | n | p (sign-flip) | "
              "p (t) | verdict |", "|---|---|---|---|---|---|---|"]
    lines += [_row(c) for c in claims]
    lines += ["", "| instability barrier | mean (pp) | 95% interval | n pairs | verdict |",
              "|---|---|---|---|---|"]
    for k, ci in summary["instability"]["by_rewind"].items():
        interval = "-" if ci["low"] is None else f"[{ci['low'] * 100:.2f}, {ci['high'] * 100:.2f}]"
        lines.append(f"| k = {k} | {ci['mean'] * 100:.2f} | {interval} | {ci['n']} | "
                     f"{ci['verdict']} |")
    signs = summary["sign_changes"]
    lines += ["", "Share of weights whose sign differs from initialisation ("
              f"{signs['source']}): " + ", ".join(
                  f"step {s}: {v:.2%}" for s, v in signs["fraction_vs_init"].items()) + ".",
              "", "| window (equal spacing) | gap (updates) | records | sign flips per update |",
              "|---|---|---|---|"]
    lines += [f"| {w['window']} | {w['gap']} | {w['records']} | {w['rate']:.2e} |"
              for w in signs["flip_rate_windows"]]
    return "\n".join(lines) + "\n"
