"""`distill bench variance` on the mixture: the table's rows, their fields and what they must satisfy."""

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_variance_writes_one_row_per_estimator(tmp_path):
    out = tmp_path / "bench.json"
    r = run_cli("bench", "variance", "--config", "configs/gmm.yaml", "--replicates", "24", "--warmup-steps", "300",
                "--json", str(out), "data.batch_size=128", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == ["baseline", "K=4", "K=16", "K=16+adaptive", "K=16+adaptive+stratified", "auto"]
    assert "300-step warm-up" in result["state"]
    for row in result["rows"]:
        for key in ("name", "K", "proposal", "stratify", "var_trace", "mean_dist", "mean_se", "flops", "seconds",
                    "ecm", "ecm_oracle"):
            assert key in row, key
        assert row["var_trace"] > 0 and row["flops"] > 0 and row["seconds"] > 0
    rows = {row["name"]: row for row in result["rows"]}
    base = rows["baseline"]
    # FLOPs follow N (c_u + K c_i) exactly
    c_u, c_i, N = result["cost_upstream_flops"], result["cost_inner_flops"], result["N"]
    assert rows["K=16"]["flops"] == pytest.approx(N * (c_u + 16 * c_i))
    # K = 16 draws: the within-sample part of the variance shrinks 16x; the whole cannot grow, and with
    # R = 24 replicates the trace is known to about sqrt(2/24) = 29%: demand a cut beyond that noise
    assert rows["K=16"]["var_trace"] < 0.6 * base["var_trace"]
    # unbiased: the mean of every estimator within 4 standard errors of the baseline's
    for row in result["rows"][1:]:
        assert row["mean_dist"] <= 4 * row["mean_se"], row["name"]
    assert "| baseline |" in r.stdout and "unbiased" in r.stdout
