"""Reports of experiment runs: metrics tables (via esr.metrics, never recomputed here) and plots.

- fig2_esr_by_model.png: multi-attempt and ESR rate per run/model with Wilson 95 % intervals
  (the paper's Figure 2), the unsteered baseline's multi-attempt rate beside them (exp 8);
- fig3_boost_sweep.png: rates and first-attempt score against the boost level, in multiples of
  each latent's own threshold (the paper's Figure 3, with per-latent levels);
- fig4_meta_prompt.png: the exp 1 trials against the same trials with a meta-prompt (exp 5);
- fig5_ablation.png: the exp 1 trials against the same trials with the OTD set ablated (exp 3) and
  with matched random sets ablated (exp 10): rates, and relative reductions with paired
  latent-bootstrap intervals;
- fig6_otd_trace.png: OTD activation around the restart phrase of self-correction episodes, from
  `esr trace` (RUN_DIR/trace/trace.json), against the unsteered baseline.
Paired comparisons (same latent, prompt and seed) get McNemar tests.
"""

from __future__ import annotations

import json
from pathlib import Path

from esr.errors import EsrError
from esr.metrics import Trial, compute_metrics, format_metrics, mcnemar, paired_change, paired_outcomes

ORDER = {"exp1": 0, "exp8": 1, "exp2": 2, "exp5": 3, "exp3": 4, "exp10": 5}
PAIRED_WITH_EXP1 = ("exp5", "exp8", "exp3", "exp10")


def load_run(run_dir: str | Path) -> dict:
    from esr.experiment import read_trials

    d = Path(run_dir)
    meta = d / "config.json"
    if not meta.is_file():
        raise EsrError(f"{d} is not an esr run directory (no config.json); pass the directory "
                       "`esr run` wrote")
    cfg = json.loads(meta.read_text())
    cal_path = d / "calibration.json"
    abl_path = d / "ablation_sets.json"
    from esr.trace import load_trace
    log = [json.loads(x) for x in (d / "log.jsonl").read_text().split("\n") if x.strip()] \
        if (d / "log.jsonl").exists() else []
    name = cfg["config"]["run"]["name"] + ("-quick" if cfg.get("quick") else "")
    return {"dir": str(d), "name": name, "model": cfg["config"]["run"]["model"], "config": cfg,
            "rows": read_trials(d / "trials.jsonl"),
            "calibration": json.loads(cal_path.read_text()) if cal_path.exists() else {},
            "ablation_sets": json.loads(abl_path.read_text()) if abl_path.exists() else {},
            "trace": load_trace(d), "log": log}


def _groups(rows: list[dict]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = {}
    for r in rows:
        out.setdefault((r.get("experiment", "?"), r.get("condition", "?")), []).append(r)

    def sort_key(k):
        exp, cond = k
        lv = next((r.get("level") for r in out[k] if r.get("level") is not None), 0.0)
        head, _, tail = cond.rpartition(":")  # ablate_random:10 after ablate_random:9
        return (ORDER.get(exp, 9), lv if exp == "exp2" else 0.0,
                (head, int(tail)) if tail.isdigit() else (cond, -1))

    return {k: out[k] for k in sorted(out, key=sort_key)}


def _calibration_summary(cal: dict) -> dict:
    import numpy as np

    vals = [v for v in cal.values() if isinstance(v, dict)]
    ok = [v for v in vals if v.get("error") is None and v.get("threshold") is not None]
    th = np.array([v["threshold"] for v in ok]) if ok else np.array([])
    at_bound = 0
    for v in ok:
        c = v.get("config") or {}
        if c:
            tol = 0.01 * (c["upper"] - c["lower"])
            at_bound += v["threshold"] <= c["lower"] + tol or v["threshold"] >= c["upper"] - tol
    ach = [v["achieved_score"] for v in ok if v.get("achieved_score") is not None]
    return {"latents": len(vals), "calibrated": len(ok), "failed": len(vals) - len(ok),
            "at_bound": int(at_bound), "cached": sum(bool(v.get("cached")) for v in vals),
            "threshold_median": float(np.median(th)) if len(th) else None,
            "threshold_q25_q75": [float(np.percentile(th, 25)), float(np.percentile(th, 75))]
            if len(th) else None,
            "verification_mean_score": float(np.mean(ach)) if ach else None}


def analyze(run_dirs: list, exclude_degenerate: bool = False, n_boot: int = 2000, seed: int = 0) -> dict:
    runs = [load_run(d) for d in run_dirs]
    names = [r["name"] for r in runs]
    for r in runs:  # two runs of one config name: tell them apart by directory
        if names.count(r["name"]) > 1:
            r["name"] = f"{r['name']} ({Path(r['dir']).name})"
    out = []
    for r in runs:
        groups = []
        trials_by = {}
        for (exp, cond), rows in _groups(r["rows"]).items():
            trials = [Trial.from_row(x) for x in rows]
            trials_by[(exp, cond)] = trials
            m = compute_metrics(trials, exclude_degenerate=exclude_degenerate, n_boot=n_boot, seed=seed)
            level = next((x.get("level") for x in rows if x.get("level") is not None), None)
            groups.append({"experiment": exp, "condition": cond, "level": level, "metrics": m})
        pairs = []
        base = trials_by.get(("exp1", "steered"))
        if base:
            for (exp, cond), trials in trials_by.items():
                if exp not in PAIRED_WITH_EXP1:
                    continue
                for outcome in ("multi_attempt", "esr"):
                    po = paired_outcomes(base, trials, outcome, exclude_degenerate=exclude_degenerate)
                    if po:
                        pairs.append({"a": "exp1 steered", "b": f"{exp} {cond}", "outcome": outcome,
                                      "test": mcnemar(po)})
        ablation = _ablation(trials_by, exclude_degenerate, n_boot, seed)
        out.append({"name": r["name"], "dir": r["dir"], "model": r["model"], "groups": groups,
                    "pairs": pairs, "calibration": _calibration_summary(r["calibration"]),
                    "ablation": ablation, "ablation_sets": r["ablation_sets"], "trace": r["trace"],
                    "log": r["log"], "config": r["config"]})
    return {"runs": out, "exclude_degenerate": exclude_degenerate}


def _ablation(trials_by: dict, exclude_degenerate: bool, n_boot: int, seed: int) -> list[dict]:
    """Exp 1 against the same trials under each ablation (exp 3, every exp 10 set, and the exp 10
    sets pooled): rates, difference and relative reduction, McNemar for single sets."""
    base = trials_by.get(("exp1", "steered"))
    if not base:
        return []
    conds = [(f"{e} {c}", [t]) for (e, c), t in trials_by.items() if e in ("exp3", "exp10")]
    randoms = [t for (e, _), t in trials_by.items() if e == "exp10"]
    if len(randoms) > 1:
        conds.append((f"exp10 pooled ({len(randoms)} sets)", randoms))
    return [{"name": name, "sets": len(sets), **{
        outcome: paired_change(base, sets, outcome, exclude_degenerate=exclude_degenerate,
                               n_boot=n_boot, seed=seed)
        for outcome in ("multi_attempt", "esr")}} for name, sets in conds]


def _ci(e, scale: float = 100) -> str:
    return f"[{e.bootstrap[0] * scale:.1f}, {e.bootstrap[1] * scale:.1f}]" if e.bootstrap else "[-]"


def format_ablation(r: dict) -> list[str]:
    """Report lines of the ablation experiments of one run."""
    lines = []
    sets = r.get("ablation_sets") or {}
    if sets.get("otd"):
        o = sets["otd"]
        lines.append(f"{r['name']}: OTD set {o.get('file')}: {len(o['latents'])} latents ablated at "
                     f"{o['site']} with SAE {o['sae']}")
    if sets.get("random"):
        m = sets["random"].get("matching") or {}
        tol = m.get("tolerance") or {}
        per = "; ".join(f"set {i}: mean |d log10 freq| {x.get('mean_abs_dlog10_freq')}, mean "
                        f"|rel d mean act| {x.get('mean_abs_rel_dmean_act')}"
                        for i, x in enumerate(m.get("sets") or []))
        lines.append(f"{r['name']}: {len(sets['random']['latents'])} random sets matched on firing "
                     f"frequency and mean activation over {sets['random'].get('stats_source')} "
                     f"(tolerance |d log10 freq| <= {tol.get('log10_freq')}, |rel d mean act| <= "
                     f"{tol.get('mean_act_rel')}, {m.get('n_widened', 0)} partners needed wider "
                     f"tolerances): {per}")
    for a in r.get("ablation", []):
        parts = []
        for outcome, label in (("multi_attempt", "multi-attempt"), ("esr", "ESR")):
            c = a[outcome]
            if c.rate_a.value is None:
                continue
            rr = "-" if c.relative_reduction.value is None else \
                f"{c.relative_reduction.value * 100:.1f}% {_ci(c.relative_reduction)}"
            test = f", McNemar p = {c.mcnemar.p_value:.3g}" if c.mcnemar else ""
            parts.append(f"{label} {c.rate_a.value * 100:.1f}% -> {c.rate_b.value * 100:.1f}% "
                         f"(relative reduction {rr}{test})")
        if parts:
            c = a["multi_attempt"]
            lines.append(f"{r['name']}: ablation {a['name']} vs exp1 steered, {c.rate_a.denominator} "
                         f"trials paired ({c.n_pairs} pairs, {c.n_clusters} latents): "
                         + "; ".join(parts))
    return lines


def _pct(e) -> str:
    if e.value is None:
        return "-"
    lo, hi = e.wilson or (None, None)
    return f"{e.value * 100:5.1f}% [{lo * 100:.1f}, {hi * 100:.1f}]" if lo is not None else \
        f"{e.value * 100:5.1f}%"


def format_report(a: dict, detailed: bool = True) -> str:
    lines = []
    head = (f"{'run':<28} {'experiment':<6} {'condition':<24} {'n':>5}  {'multi-attempt [Wilson]':<24}"
            f"{'ESR [Wilson]':<24}{'first score':>11}")
    lines += ["ESR summary (95% Wilson intervals; cluster-bootstrap intervals in the tables below)",
              head, "-" * len(head)]
    for r in a["runs"]:
        for g in r["groups"]:
            m = g["metrics"]
            fs = m.mean_first_score.value
            lines.append(f"{r['name'][:28]:<28} {g['experiment']:<6} {g['condition'][:24]:<24} "
                         f"{m.n_included:>5}  {_pct(m.multi_attempt_rate):<24}{_pct(m.esr_rate):<24}"
                         f"{'-' if fs is None else f'{fs:.1f}':>11}")
    lines.append("")
    for r in a["runs"]:
        c = r["calibration"]
        if c["latents"]:
            q = c["threshold_q25_q75"]
            lines.append(f"{r['name']}: calibration {c['calibrated']}/{c['latents']} latents "
                         f"({c['failed']} failed, {c['at_bound']} at a search bound, {c['cached']} "
                         f"from cache); threshold median {c['threshold_median']:.1f} "
                         f"(IQR {q[0]:.1f}-{q[1]:.1f})" if c["calibrated"] else
                         f"{r['name']}: calibration failed for all {c['latents']} latents")
            if c["verification_mean_score"] is not None:
                lines.append(f"  verification: mean first-attempt score at the thresholds "
                             f"{c['verification_mean_score'] * 100:.1f}/100")
        for p in r["pairs"]:
            t = p["test"]
            lines.append(f"{r['name']}: {p['outcome']} {p['a']} vs {p['b']}: {t.n_pairs} pairs, "
                         f"only A {t.only_a}, only B {t.only_b}, McNemar exact p = {t.p_value:.3g}")
        lines += format_ablation(r)
        if r.get("trace"):
            from esr.trace import format_trace

            lines += [f"{r['name']}: " + format_trace(r["trace"])]
        secs = sum(x.get("seconds", 0) for x in r["log"])
        if secs:
            lines.append(f"{r['name']}: stage time {secs / 60:.1f} min "
                         f"({', '.join(_stage_time(x) for x in r['log'])})")
    if detailed:
        for r in a["runs"]:
            for g in r["groups"]:
                lines += ["", format_metrics(g["metrics"], title=f"== {r['name']}: {g['experiment']} "
                                                               f"{g['condition']}")]
    return "\n".join(lines)


def _stage_time(x: dict) -> str:
    return f"{x['stage']} {x['seconds']:.0f}s"


def _err(e) -> tuple[float, float]:
    if e.value is None or e.wilson is None:
        return (0.0, 0.0)
    return (max(0.0, (e.value - e.wilson[0]) * 100), max(0.0, (e.wilson[1] - e.value) * 100))


def _find(r: dict, exp: str, cond: str | None = None):
    return next((g for g in r["groups"] if g["experiment"] == exp
                 and (cond is None or g["condition"] == cond)), None)


def plot_models(a: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in a["runs"] if _find(r, "exp1", "steered")]
    if not runs:
        return None
    bars = [("multi-attempt", "exp1", "steered", "multi_attempt_rate", "tab:blue"),
            ("ESR", "exp1", "steered", "esr_rate", "tab:red"),
            ("multi-attempt, unsteered", "exp8", "unsteered", "multi_attempt_rate", "tab:gray")]
    x = np.arange(len(runs))
    w = 0.27
    fig, ax = plt.subplots(figsize=(max(5, 1.8 * len(runs) + 2), 4))
    for b, (label, exp, cond, attr, color) in enumerate(bars):
        vals, errs = [], []
        for r in runs:
            g = _find(r, exp, cond)
            e = getattr(g["metrics"], attr) if g else None
            vals.append((e.value or 0) * 100 if e else 0)
            errs.append(_err(e) if e else (0, 0))
        if not any(_find(r, exp, cond) for r in runs):
            continue
        ax.bar(x + (b - 1) * w, vals, w, yerr=np.array(errs).T, capsize=3, label=label, color=color)
    ax.set_xticks(x, [f"{r['name']}\nn={_find(r, 'exp1', 'steered')['metrics'].n_included}"
                      for r in runs], fontsize=8)
    ax.set_ylabel("% of trials")
    ax.set_title("ESR and multi-attempt rate (95% Wilson intervals)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_sweep(a: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    runs = [r for r in a["runs"] if any(g["experiment"] == "exp2" for g in r["groups"])]
    if not runs:
        return None
    panels = [("multi_attempt_rate", "multi-attempt rate (%)", True),
              ("esr_rate", "ESR rate (%)", True),
              ("improvement_rate", "improvement rate (% of multi)", True),
              ("mean_first_score", "mean first-attempt score", False)]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    for r in runs:
        gs = sorted((g for g in r["groups"] if g["experiment"] == "exp2"), key=lambda g: g["level"])
        xs = [g["level"] for g in gs]
        for ax, (attr, title, pct) in zip(axes, panels):
            es = [getattr(g["metrics"], attr) for g in gs]
            if pct:
                ys = [(e.value * 100 if e.value is not None else float("nan")) for e in es]
                err = list(zip(*[_err(e) for e in es]))
            else:
                ys = [e.value if e.value is not None else float("nan") for e in es]
                err = [[(e.value - e.normal[0]) if e.normal else 0 for e in es],
                       [(e.normal[1] - e.value) if e.normal else 0 for e in es]]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=r["name"])
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("boost (x the latent's own threshold)", fontsize=8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_meta(a: dict, path: Path) -> Path | None:
    import matplotlib.pyplot as plt
    import numpy as np

    rows = []
    for r in a["runs"]:
        base = _find(r, "exp1", "steered")
        variants = [g for g in r["groups"] if g["experiment"] == "exp5"]
        if base and variants:
            rows.append((r, [("baseline", base)] + [(g["condition"].split(":", 1)[-1], g)
                                                    for g in variants]))
    if not rows:
        return None
    fig, axes = plt.subplots(1, len(rows), figsize=(4.5 * len(rows) + 1, 4), squeeze=False)
    for ax, (r, conds) in zip(axes[0], rows):
        x = np.arange(len(conds))
        for k, (attr, label, color) in enumerate([("multi_attempt_rate", "multi-attempt", "tab:blue"),
                                                  ("esr_rate", "ESR", "tab:red")]):
            es = [getattr(g["metrics"], attr) for _, g in conds]
            ax.bar(x + (k - 0.5) * 0.38, [(e.value or 0) * 100 for e in es], 0.38,
                   yerr=np.array([_err(e) for e in es]).T, capsize=3, label=label, color=color)
        ax.set_xticks(x, [c for c, _ in conds], fontsize=8, rotation=15)
        ax.set_title(r["name"], fontsize=9)
        ax.set_ylabel("% of trials")
        ax.legend(fontsize=8)
    fig.suptitle("Meta-prompt vs the same trials without it (95% Wilson intervals)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_ablation(a: dict, path: Path) -> Path | None:
    """Per run: rates without and with each ablation, the relative reductions, and the mean
    first-attempt score (an ablation that degrades every answer also changes the rates)."""
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in a["runs"] if r.get("ablation")]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 3, figsize=(17, 3.8 * len(runs)), squeeze=False)
    for (ax_rate, ax_rr, ax_score), r in zip(axes, runs):
        abl = r["ablation"]
        names = ["exp1 (same trials)"] + [x["name"].replace("ablate_", "") for x in abl]
        x = np.arange(len(names))
        for k, (o, label, color) in enumerate((("multi_attempt", "multi-attempt", "tab:blue"),
                                               ("esr", "ESR", "tab:red"))):
            es = [abl[0][o].rate_a] + [c[o].rate_b for c in abl]
            ax_rate.bar(x + (k - 0.5) * 0.38, [(e.value or 0) * 100 for e in es], 0.38,
                        yerr=np.array([_err(e) for e in es]).T, capsize=3, label=label, color=color)
            rr = [c[o].relative_reduction for c in abl]
            vals = [(e.value or 0) * 100 for e in rr]
            err = [[max(0.0, v - e.bootstrap[0] * 100) if e.bootstrap else 0 for v, e in zip(vals, rr)],
                   [max(0.0, e.bootstrap[1] * 100 - v) if e.bootstrap else 0 for v, e in zip(vals, rr)]]
            ax_rr.bar(x[1:] + (k - 0.5) * 0.38, vals, 0.38, yerr=err, capsize=3, label=label,
                      color=color)
        ax_rate.set_xticks(x, names, fontsize=7, rotation=20)
        ax_rate.set_ylabel("% of trials")
        ax_rate.set_title(f"{r['name']}: rates (95% Wilson)", fontsize=9)
        ax_rate.legend(fontsize=8)
        ax_rr.axhline(0, color="black", lw=0.8)
        ax_rr.set_xticks(x[1:], names[1:], fontsize=7, rotation=20)
        ax_rr.set_ylabel("relative reduction vs exp1 (%)")
        ax_rr.set_title("relative reduction (95% paired latent bootstrap)", fontsize=9)
        if all(c[o].relative_reduction.value is None for c in abl for o in ("multi_attempt", "esr")):
            ax_rr.text(0.5, 0.75, "undefined: no multi-attempt trial in exp 1", ha="center",
                       transform=ax_rr.transAxes, fontsize=9)
        gs = [g for g in r["groups"] if (g["experiment"], g["condition"]) == ("exp1", "steered")
              or g["experiment"] in ("exp3", "exp10")]
        es = [g["metrics"].mean_first_score for g in gs]
        ax_score.bar(np.arange(len(gs)), [e.value or 0 for e in es], color="tab:green",
                     yerr=np.array([[(e.value - e.normal[0]) if e.normal else 0 for e in es],
                                    [(e.normal[1] - e.value) if e.normal else 0 for e in es]]),
                     capsize=3)
        ax_score.set_xticks(np.arange(len(gs)), [f"{g['experiment']} "
                                                 f"{g['condition'].replace('ablate_', '')}"
                                                 for g in gs], fontsize=7, rotation=20)
        ax_score.set_ylabel("mean first-attempt score")
        ax_score.set_title("first-attempt score (95% normal)", fontsize=9)
    fig.suptitle("Ablating the off-topic detectors vs matched random latents, same trials", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_trace(a: dict, path: Path) -> Path | None:
    """Mean OTD activation in token bins around the restart phrase, and by region."""
    import matplotlib.pyplot as plt
    import numpy as np

    runs = [r for r in a["runs"] if r.get("trace")]
    if not runs:
        return None
    fig, axes = plt.subplots(len(runs), 2, figsize=(12, 3.8 * len(runs)), squeeze=False)
    for (ax_curve, ax_bar), r in zip(axes, runs):
        s = r["trace"]["summary"]
        bins = [b for b in s["bins"] if b["mean"] is not None]
        xs = [(b["start"] + b["end"]) / 2 for b in bins]
        ax_curve.plot(xs, [b["mean"] for b in bins], marker=".", color="tab:purple",
                      label=f"self-correction episodes (n={s['n_episodes']})")
        lo = [b["ci"][0] if b["ci"] else b["mean"] for b in bins]
        hi = [b["ci"][1] if b["ci"] else b["mean"] for b in bins]
        ax_curve.fill_between(xs, lo, hi, color="tab:purple", alpha=0.2)
        base = s["regions"]["baseline"]
        if base["mean"] is not None:
            ax_curve.axhline(base["mean"], color="tab:gray", ls="--",
                             label=f"unsteered baseline (n={base['n']})")
        ax_curve.axvline(0, color="black", lw=0.8)
        ax_curve.set_xlabel("tokens relative to the restart phrase")
        ax_curve.set_ylabel("mean OTD activation")
        ax_curve.set_title(f"{r['name']}: {len(r['trace']['otd']['latents'])} OTDs at "
                           f"{r['trace']['otd']['site']}", fontsize=9)
        ax_curve.legend(fontsize=7)
        keys = ["first_attempt", "restart_phrase", "after_correction", "steered_single", "baseline"]
        labels = ["first attempt", "restart", "after", "steered,\none attempt", "unsteered"]
        reg = [s["regions"][k] for k in keys]
        vals = [x["mean"] or 0 for x in reg]
        err = [[max(0.0, v - x["ci"][0]) if x["ci"] else 0 for v, x in zip(vals, reg)],
               [max(0.0, x["ci"][1] - v) if x["ci"] else 0 for v, x in zip(vals, reg)]]
        ax_bar.bar(np.arange(len(keys)), vals, yerr=err, capsize=3,
                   color=["tab:purple"] * 3 + ["tab:blue", "tab:gray"])
        ax_bar.set_xticks(np.arange(len(keys)), labels, fontsize=8)
        ax_bar.set_title("mean OTD activation by region (95% latent bootstrap)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(run_dirs: list, out_dir: str | Path, exclude_degenerate: bool = False,
                 n_boot: int = 2000, plots: bool = True) -> tuple[str, list[Path]]:
    """Analyse, write report.txt, metrics.json and the plots into out_dir; return (text, files)."""
    a = analyze(run_dirs, exclude_degenerate=exclude_degenerate, n_boot=n_boot)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = format_report(a)
    files = [out / "report.txt", out / "metrics.json"]
    files[0].write_text(text + "\n")
    files[1].write_text(json.dumps([
        {"name": r["name"], "dir": r["dir"], "model": r["model"], "calibration": r["calibration"],
         "groups": [{"experiment": g["experiment"], "condition": g["condition"], "level": g["level"],
                     "metrics": g["metrics"].to_dict()} for g in r["groups"]],
         "pairs": [{**{k: v for k, v in p.items() if k != "test"}, "test": p["test"].__dict__}
                   for p in r["pairs"]],
         "ablation": [{"name": x["name"], "sets": x["sets"],
                       **{o: x[o].to_dict() for o in ("multi_attempt", "esr")}}
                      for x in r["ablation"]],
         "trace": r["trace"]["summary"] if r.get("trace") else None}
        for r in a["runs"]], indent=1))
    if plots:
        import matplotlib

        matplotlib.use("Agg")
        for fn, name in ((plot_models, "fig2_esr_by_model.png"), (plot_sweep, "fig3_boost_sweep.png"),
                         (plot_meta, "fig4_meta_prompt.png"), (plot_ablation, "fig5_ablation.png"),
                         (plot_trace, "fig6_otd_trace.png")):
            p = fn(a, out / name)
            if p:
                files.append(p)
    return text, files
