"""`distill bench variance` on the mixture: the table's rows, their fields and what they must satisfy."""

import json

import pytest
import torch

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
    # the ceiling (sigma_b2 + sigma_w2) / sigma_b2 when the split-half sigma_b2 is positive, each row's fraction of
    # it, and every cut with an interval
    from distill.bench import variance_cut_ceiling

    ceiling = variance_cut_ceiling(result["sigma_b2"], result["sigma_w2"])
    assert result["var_cut_ceiling"] == ceiling
    for row in result["rows"]:
        assert row["ceiling_fraction"] == (pytest.approx(row["var_reduction"] / ceiling) if ceiling else None)
        lo, hi = row["var_cut_ci"]
        assert 0 < lo <= hi and isinstance(row["heavy_tail"], bool), row["name"]
    assert "variance-cut ceiling" in r.stdout


def test_the_mixture_at_the_command_defaults_is_flagged_heavy_tailed(tmp_path):
    # The state issue 14 reported (200 warm-up steps, R = 32): a few baseline replicates hold most of the variance
    # (K = 4 uniform then "cut" it 27x, impossible for a mean of 4 iid draws). Pinned: the flag must say so, on
    # every row, since every ratio is taken against that baseline.
    out = tmp_path / "bench.json"
    r = run_cli("bench", "variance", "--config", "configs/gmm.yaml", "--json", str(out), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["replicates"] == 32 and "200-step warm-up" in result["state"]
    base = result["rows"][0]
    assert base["var_rel_se"] > 0.5 and all(row["heavy_tail"] for row in result["rows"])
    assert "ratios not reliable" in r.stdout


# --------------------------------------------------------------------------------------------------------------
# Input refused with one line before anything runs


@pytest.fixture(scope="module")
def gmm_ckpt(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("bench") / "run"
    r = run_cli("fit", "--config", "configs/gmm.yaml", f"run.dir={run_dir}", "trainer.max_steps=10",
                "logging.wandb=disabled", "logging.progress_bar=false", "eval.fid_every_steps=0",
                "logging.samples_every_steps=0", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir / "checkpoints" / "last.ckpt"


def bench(capsys, *args) -> tuple[int, str]:
    """`distill bench variance ARGS` in this process: (status, the one line on stderr)."""
    from distill.cli import main

    capsys.readouterr()
    code = main(["bench", "variance", *args])
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


def test_a_checkpoint_of_other_networks_is_named_in_one_line(gmm_ckpt, capsys, tmp_path):
    out = tmp_path / "bench.json"
    code, line = bench(capsys, "--config", "configs/gmm.yaml", "generator.mlp_hidden=64", "--ckpt", str(gmm_ckpt),
                       "--json", str(out))
    assert code == 2 and line.startswith("distill bench: error: ")
    assert str(gmm_ckpt) in line and "other networks" in line and "configs/gmm.yaml" in line
    assert len(line) < 400 and not out.exists()


@pytest.mark.parametrize("args, named", [
    (["--warmup-steps", "0"], "--warmup-steps 0: expected an integer >= 1"),
    (["--replicates", "1"], "--replicates 1: expected an integer >= 2"),
    (["--device", "tpu"], "--device 'tpu'"),
])
def test_bad_options_are_named(capsys, args, named):
    code, line = bench(capsys, "--config", "configs/gmm.yaml", *args)
    assert code == 2 and named in line and "max_steps" not in line


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_a_gpu_is_refused(gmm_ckpt, capsys):
    code, line = bench(capsys, "--config", "configs/gmm.yaml", "--ckpt", str(gmm_ckpt), "--device", "cuda")
    assert code == 2 and "--device cuda: no CUDA device here; expected cpu or auto" in line


def test_a_multi_step_student_is_benched_at_the_step_training_draws(monkeypatch):
    """Four steps: every gradient the bench estimates is at one student step k's x0 by backward simulation (never
    the whole chain under grad), k varies over replicates, and the result says how many steps."""
    from distill.bench import bench_variance, format_table
    from distill.config import FitConfig, load_config
    from distill.teachers import Generator

    seen = []
    forward = Generator.forward

    def spy(self, z, cond=None, noise=None, generator=None, until=None):
        seen.append((until, torch.is_grad_enabled()))
        return forward(self, z, cond, noise=noise, generator=generator, until=until)

    monkeypatch.setattr(Generator, "forward", spy)
    overrides = ["generator.timesteps=[999,749,499,249]", "data.batch_size=32"]
    cfg = load_config(FitConfig, "configs/gmm.yaml", overrides)
    result = bench_variance(cfg, replicates=8, warmup_steps=20, pilot_rounds=2, diagnostic_rounds=8, progress=False,
                            config_path="configs/gmm.yaml", overrides=overrides)
    assert result["student_steps"] == 4
    benched = [u for u, grad in seen if grad]  # the gradients' samples (the sampling for grids runs without grad)
    assert benched and all(u is not None and 0 <= u < 4 for u in benched), set(benched)
    assert len(set(benched)) > 1  # k drawn per replicate, not fixed
    assert result["rows"][0]["var_trace"] > 0
    import subprocess

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    assert result["commit"].removesuffix("+dirty") == head  # the code that measured, recorded
    # the ceiling, and every ratio with its interval (the baseline against itself: exactly 1)
    assert result["sigma_b2"] == 0 and result["var_cut_ceiling"] is None  # here (the CLI test checks a real one)
    base = result["rows"][0]
    assert base["var_cut_ci"] == [1.0, 1.0] and base["ceiling_fraction"] is None
    for row in result["rows"]:
        lo, hi = row["var_cut_ci"]
        assert lo <= hi and isinstance(row["heavy_tail"], bool), row["name"]
        assert row["ecm_ci"] == pytest.approx([lo * base["flops"] / row["flops"], hi * base["flops"] / row["flops"]])
    assert "var cut [95%]" in format_table(result)


def test_replicates_too_large_for_the_memory_bound_leave_the_intervals_out():
    from distill.bench import bench_variance, format_table
    from distill.config import FitConfig, load_config

    cfg = load_config(FitConfig, "configs/gmm.yaml", ["data.batch_size=32"])
    result = bench_variance(cfg, replicates=4, warmup_steps=20, pilot_rounds=2, diagnostic_rounds=2, progress=False,
                            config_path="configs/gmm.yaml", overrides=["data.batch_size=32"], keep_bytes=0)
    assert all(row["var_cut_ci"] is None and row["heavy_tail"] is None for row in result["rows"])
    assert result["intervals"].startswith("left out") and "left out" in format_table(result)
