"""The README's variance tables, rendered from benchmarks/results/variance-*.json (what benchmarks/variance.sh wrote),
so that the README carries exactly what the JSON holds, with the commit that measured it: one table per file, then
two summaries: K auto against the best fixed estimator of the same run (ECM), and the digits training states.

    python benchmarks/variance_tables.py [JSON ...]
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT = ["variance-digits.json", "variance-digits-four.json", "variance-gmm.json", "variance-t2i-digits.json",
           "variance-digits-step0500.json", "variance-digits-step1000.json", "variance-digits-step1500.json"]


def _state(result: dict) -> str:
    """The state as the README reads it: a checkpoint of variance.sh's baseline run by its step, not its temporary
    path."""
    found = re.search(r"step=0*(\d+)\.ckpt$", result["state"])
    return f"step {int(found.group(1)):,} of a 1,500-step baseline run" if found else result["state"]


def _interval(v: float, ci: list[float] | None, unit: str = "") -> str:
    return f"{v:.3g}{unit}" + (f" [{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "")


def render(result: dict) -> str:
    ceiling = result.get("var_cut_ceiling")
    steps = result.get("student_steps", 1)
    title = result["config"] + (" " + " ".join(result["overrides"]) if result.get("overrides") else "")
    head = (f"**{title}** (commit {result.get('commit', '?')})\n\n"
            f"{_state(result)}; {steps} student step{'s' if steps > 1 else ''}; N = {result['N']}, "
            f"R = {result['replicates']} replicates; σ_b² = {result['sigma_b2']:.3g}, σ_w² = {result['sigma_w2']:.3g}; "
            + (f"across the student steps N·V_k = {result['sigma_b2_steps']:.3g}; "
               if result.get("sigma_b2_steps") is not None else "")
            + f"ceiling (σ_b² + σ_w²)/σ_b² = {f'{ceiling:.3g}×' if ceiling else 'none (σ_b² = 0)'}"
            + (" (σ_b² with N·V_k)" if result.get("sigma_b2_steps") is not None else "")
            + (f", {lo:.3g}× to {f'{hi:.3g}×' if hi else 'unbounded'} with σ_b² ± 1.96 SE"
               if (r := result.get("var_cut_ceiling_range")) and (lo := r[0]) and ((hi := r[1]) or True) else "")
            + "; "
            f"c_u/c_i = {result['cost_upstream_flops'] / result['cost_inner_flops']:.2f} (FLOPs); "
            f"auto K = {result['k_auto']}")
    lines = ["| estimator | K | variance cut [95%] | of ceiling | mean_dist / mean_se | s / estimate | ECM [95%] | "
             "ECM oracle | heavy tail |", "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        frac = r.get("ceiling_fraction")
        lines.append(
            f"| {r['name']} | {r['K']} | {_interval(r['var_reduction'], r.get('var_cut_ci'), '×')} | "
            f"{f'{frac:.0%}' if frac is not None else '—'} | "
            + ("—" if r["name"] == "baseline" else f"{r['mean_dist']:.3g} / {r['mean_se']:.3g}")
            + f" | {r['seconds']:.3g} | {_interval(r['ecm'], r.get('ecm_ci'))} | {r['ecm_oracle']:.3g} | "
            f"{'**yes**' if r.get('heavy_tail') else 'no'} |")
    return head + "\n\n" + "\n".join(lines)


def _pm(se: float | None) -> str:
    return f" ± {se:.2g}" if se is not None else ""


def _title(result: dict) -> str:
    return result["config"] + (" " + " ".join(result["overrides"]) if result.get("overrides") else "")


def auto_summary(results: list[dict]) -> str:
    """K auto's ECM against the best fixed estimator's (baseline included) in the same run, and the fraction."""
    lines = ["| run | auto K | auto ECM [95%] | best fixed | its ECM [95%] | auto / best [95%, paired] |",
             "|---|---|---|---|---|---|"]
    for res in results:
        auto = next(r for r in res["rows"] if r["name"] == "auto")
        best = max((r for r in res["rows"] if r["name"] != "auto"), key=lambda r: r["ecm"])
        where = _state(res).split(" (")[0].replace("after a ", "").replace(" run of this config", "")
        lines.append(f"| {_title(res)}, {where} | {auto['K']} | {_interval(auto['ecm'], auto.get('ecm_ci'))} | "
                     f"{best['name']} | {_interval(best['ecm'], best.get('ecm_ci'))} | {auto['ecm'] / best['ecm']:.0%}"
                     + (f" [{ci[0]:.0%}, {ci[1]:.0%}]" if (ci := auto.get("ecm_vs_best_fixed_ci")) else "") + " |")
    return "\n".join(lines)


def states_summary(results: list[dict]) -> str:
    """The digits training states: the ceiling and how much of it each estimator reaches, step by step."""
    lines = ["| state | σ_b² | σ_w² | ceiling | K=16+adaptive+stratified cut [95%] (of ceiling) | auto K, ECM [95%] |",
             "|---|---|---|---|---|---|"]
    for res in results:
        best = next(r for r in res["rows"] if r["name"] == "K=16+adaptive+stratified")
        auto = next(r for r in res["rows"] if r["name"] == "auto")
        ceiling = res.get("var_cut_ceiling")
        frac = best.get("ceiling_fraction")
        lines.append(f"| {_state(res)} | {res['sigma_b2']:.3g}{_pm(res.get('sigma_b2_se'))} | "
                     f"{res['sigma_w2']:.3g}{_pm(res.get('sigma_w2_se'))} | "
                     f"{f'{ceiling:.3g}×' if ceiling else '—'} | "
                     f"{_interval(best['var_reduction'], best.get('var_cut_ci'), '×')}"
                     f"{f' ({frac:.0%})' if frac is not None else ''} | "
                     f"{auto['K']}, {_interval(auto['ecm'], auto.get('ecm_ci'))} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("json", nargs="*", help="result files [benchmarks/results/variance-{digits,digits-four,gmm}.json]")
    args = ap.parse_args()
    paths = args.json or [REPO / "benchmarks" / "results" / name for name in DEFAULT]
    results = [json.loads(Path(p).read_text()) for p in paths if Path(p).is_file()]
    print("\n\n".join(render(r) for r in results))
    print("\n\nK auto against the best fixed estimator of the same run:\n\n" + auto_summary(results))
    states = [r for r in results if r["state"].startswith("checkpoint")]
    if states:
        print("\n\nTraining states:\n\n" + states_summary(states))


if __name__ == "__main__":
    main()
