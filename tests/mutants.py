"""Mutation check: each promise the README makes has a test that fails when the code breaks it.

Every entry of MUTANTS is one behavioural mutation of the package (an exact text replacement in one file, the kind
of one-line slip a refactor makes) and the tests that must catch it. For each, the repository's files are copied to
a scratch folder once, the mutation is applied there (the working tree is never touched), the named tests run with
that copy first on PYTHONPATH (in-process imports and `python -m distill` subprocesses alike), and the mutant counts
as killed only if pytest reports failing tests (exit status 1). A mutant that survives, a replacement whose text is
not found exactly once (the list went stale), or tests that error out fail the whole check.

    make mutants                               # every mutant (CI runs this after the suite)
    python tests/mutants.py --list             # the list: name, promise, file, killing tests
    python tests/mutants.py --only ema-on-skip --json mutants.json

Not a test module (the name does not start with test_): pytest never collects it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    promise: str  # what the mutation breaks, in the README's words
    path: str  # file, relative to the repository root
    old: str  # exact text; must occur exactly once in the file
    new: str
    tests: tuple[str, ...]  # pytest node ids (or files) that must fail on the mutant


MUTANTS: tuple[Mutant, ...] = (
    # --- the DMD2 gradient, guidance, the two time scales, the EMA (README "Concepts")
    Mutant("dmd-normaliser-pooled", "the DMD normaliser is per draw", "distill/losses.py",
           "normaliser = (x - mu_real).abs().mean(dim=_sample_dims(x), keepdim=True)",
           "normaliser = (x - mu_real).abs().mean()",
           ("tests/test_losses.py::test_dmd_grad_normaliser_is_per_draw_not_pooled",)),
    Mutant("cfg-formula", "classifier-free guidance uncond + s (cond - uncond)", "distill/teachers/denoiser.py",
           "return uncond + guidance_scale * (cond - uncond)", "return cond + guidance_scale * (cond - uncond)",
           ("tests/test_teachers.py::test_classifier_free_guidance_is_one_batched_call_of_the_formula",)),
    Mutant("ttur-ignored", "the generator is updated every optim.ttur steps, the fake score every step",
           "distill/module.py", "update_generator = self.step % self.cfg.optim.ttur == 0", "update_generator = True",
           ("tests/test_wiring_module.py::test_generator_every_ttur_steps_and_fake_score_every_step",)),
    Mutant("ema-no-warm-up", "the generator's EMA with its warm-up", "distill/teachers/denoiser.py",
           "d = min(decay, (1 + step) / (10 + step))\n", "d = decay\n",
           ("tests/test_wiring_module.py::test_ema_update_follows_the_warm_up_formula",)),
    Mutant("noise-ignores-step", "every step draws new noise; a resumed run draws what the uninterrupted one would",
           "distill/module.py", "entropy = [self.cfg.trainer.seed, rank, self.step]",
           "entropy = [self.cfg.trainer.seed, rank, 0]",
           ("tests/test_wiring_module.py::test_every_step_draws_new_noise_and_the_same_step_the_same",)),
    # --- CARV inside the module (issue 11's table and README "CARV: the estimator")
    Mutant("weights-dropped", "g_bar = (1/K) sum_k w(t_nk) g: unbiased for any proposal", "distill/carv/controller.py",
           "return (w * y).mean(dim=1)", "return y.mean(dim=1)",
           ("tests/test_carv_module.py::test_importance_weighted_estimate_is_unbiased_with_a_proposal_far_from_p",
            "tests/test_wiring_carv.py::test_training_step_applies_the_importance_weighted_mean_of_its_own_draws")),
    Mutant("split-half-half-k", "the split-half (sigma_b^2, sigma_w^2) behind K auto and the ECM figures",
           "distill/carv/diagnostics.py", "sigma_b2, sigma_w2 = split_half(*flat, N=N, K=Kd)",
           "sigma_b2, sigma_w2 = split_half(*flat, N=N, K=Kd // 2)",
           ("tests/test_wiring_carv.py::test_logged_variance_and_cost_figures_equal_an_independent_computation",)),
    Mutant("k-jumps", "K moves at most 2x per choice", "distill/carv/controller.py",
           "self.K = min(max(self.target(N, c_u, c_i), math.ceil(self.K / MAX_STEP)), self.K * MAX_STEP, self._k_max(N))",
           "self.K = min(self.target(N, c_u, c_i), self._k_max(N))",
           ("tests/test_wiring_carv.py::test_k_auto_follows_the_measured_figures_and_the_configured_cost",)),
    Mutant("k-from-ema", "K auto chooses at the posterior mean of sigma_b^2 >= 0, not its EMA clamped at 0",
           "distill/carv/controller.py",
           "return choose_k(*self.model(self.sigma_b2_posterior()), c_u, c_i, k_max=self._k_max(N))",
           "return choose_k(*self.model(), c_u, c_i, k_max=self._k_max(N))",
           ("tests/test_wiring_carv.py::test_k_auto_chooses_at_the_posterior_mean_of_the_measured_sigma_b2",
            "tests/test_carv_module.py::test_k_auto_chooses_at_the_posterior_mean_of_sigma_b2")),
    Mutant("sigma-b2-se-unweighted", "the EMA's standard error counts its weights", "distill/carv/controller.py",
           "return math.sqrt(spread * self.weight_sq / (1.0 - self.weight_sq))", "return math.sqrt(spread)",
           ("tests/test_wiring_carv.py::test_k_auto_chooses_at_the_posterior_mean_of_the_measured_sigma_b2",
            "tests/test_carv_module.py::test_k_auto_chooses_at_the_posterior_mean_of_sigma_b2")),
    Mutant("cost-time-ignored", "estimator.cost=time prices c_u and c_i in measured seconds", "distill/module.py",
           'key = "seconds" if self.cfg.estimator.cost == "time" else "flops"', 'key = "flops"',
           ("tests/test_wiring_carv.py::test_k_auto_follows_the_measured_figures_and_the_configured_cost",)),
    Mutant("ecm-of-zero-variance", "a teacher-initialised fake score (no variance yet) does not crash the diagnostic",
           "distill/module.py", "if self.costs and sb2 + sw2 > 0:", "if self.costs:",
           ("tests/test_wiring_carv.py::test_a_diagnostic_that_measures_no_variance_logs_no_ecm_and_training_goes_on",)),
    # --- ranks and skipped updates (issue 11's table)
    Mutant("noise-ignores-rank", "ranks draw different noise: the global batch is the union of the ranks' draws",
           "distill/module.py", "rank = self.global_rank if rank_specific else 2**31 - 1",
           "rank = 0 if rank_specific else 2**31 - 1",
           ("tests/test_wiring_steps.py::test_step_noise_is_a_function_of_seed_rank_and_step",)),
    Mutant("ema-on-skipped-update", "a skipped (non-finite) update moves no EMA", "distill/module.py",
           "self._ema_update(stepped)", "self._ema_update(torch.ones_like(stepped))",
           ("tests/test_wiring_steps.py::test_a_non_finite_update_changes_nothing",)),
    Mutant("proposal-on-skipped-update", "a skipped (non-finite) update feeds no proposal statistics",
           "distill/module.py", "self.sampler.record(t, sq_norm, taken)", "self.sampler.record(t, sq_norm)",
           ("tests/test_wiring_steps.py::test_a_non_finite_update_changes_nothing",)),
    Mutant("health-forgotten-on-resume", "a resumed run still names the step of the last skipped update",
           "distill/module.py", "last[0] if last else 0]", "0]",
           ("tests/test_wiring_module.py::test_health_counters_survive_a_checkpoint_round_trip",)),
    # --- evaluation, teachers, checkpoints in a real run
    Mutant("fid-real-mean-term", "in-loop fid/ema equals `distill fid` on the same checkpoint",
           "distill/callbacks/monitors.py",
           "metric.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)",
           "metric.real_features_cov_sum = sigma * (n - 1)",
           ("tests/test_wiring_eval.py::test_in_loop_fid_equals_distill_fid_on_the_same_checkpoint",)),
    Mutant("fid-monitor-own-seed", "in-loop fid/ema uses distill fid's protocol (its noise seed included)",
           "distill/callbacks/monitors.py", "PROTOCOL_SEED, pl_module.device, start=start",
           "self.cfg.trainer.seed, pl_module.device, start=start",
           ("tests/test_wiring_eval.py::test_in_loop_fid_equals_distill_fid_on_the_same_checkpoint",)),
    Mutant("guidance-not-applied", "teacher.guidance_scale > 1 distils the guided teacher", "distill/module.py",
           "mu_real = self.teacher(x_t, t_flat[sl], c, guidance_scale=self.cfg.teacher.guidance_scale)",
           "mu_real = self.teacher(x_t, t_flat[sl], c)",
           ("tests/test_wiring_eval.py::test_guided_training_uses_uncond_plus_s_times_cond_minus_uncond",)),
    Mutant("edm-sigma-data-ignored", "an EDM teacher is preconditioned with its own sigma_data",
           "distill/teachers/loading.py",
           'sigma_data=float(sched_config.get("sigma_data", 0.5)))', "sigma_data=0.5)",
           ("tests/test_wiring_eval.py::test_an_edm_teacher_is_preconditioned_as_diffusers_and_trains",)),
    Mutant("checkpoint-io-unplugged", "the Trainer writes checkpoints atomically (a full disk keeps the previous one)",
           "distill/train.py", "plugins = [AtomicCheckpointIO()]", "plugins = []",
           ("tests/test_wiring_eval.py::test_a_full_disk_in_a_real_run_keeps_the_previous_checkpoint_and_says_so",)),
    Mutant("metrics-row-after-checkpoint", "a kill right after a checkpoint loses no metrics row", "distill/train.py",
           "FlushMetrics(), checkpoint, stop]", "checkpoint, FlushMetrics(), stop]",
           ("tests/test_wiring_eval.py::test_a_kill_right_after_a_checkpoint_loses_no_metrics_row",)),
    Mutant("teacher-saves-raw-weights", "`distill teacher` saves its EMA as the diffusers folder", "distill/pretrain.py",
           'self.ema.net.unet.save_pretrained(out / "unet")', 'self.denoiser.net.unet.save_pretrained(out / "unet")',
           ("tests/test_commands.py::test_distill_teacher_saves_its_ema_as_a_diffusers_folder_that_fit_uses",)),
    # --- text-to-image teachers (README "Text-to-image teachers")
    Mutant("sdxl-null-is-the-empty-prompt", "SDXL's null condition is zeros (force_zeros_for_empty_prompt)",
           "distill/teachers/text.py", 'if self.layout == "sdxl":\n            return Condition(embeds=torch.zeros_like',
           'if False:\n            return Condition(embeds=torch.zeros_like',
           ("tests/test_t2i.py::test_the_condition_is_the_pipelines_own_prompt_encoding",)),
    Mutant("sdxl-last-hidden-state", "the condition is the pipeline's own prompt encoding (SDXL: penultimate layer)",
           "distill/teachers/text.py", "hidden.append(out.hidden_states[-2])", "hidden.append(out.hidden_states[-1])",
           ("tests/test_t2i.py::test_the_condition_is_the_pipelines_own_prompt_encoding",)),
    Mutant("fake-score-guided", "the fake score is never guided (DMD2)", "distill/module.py",
           "mu_fake = self.fake_score(x_t, t_flat[sl], c)",
           "mu_fake = self.fake_score(x_t, t_flat[sl], c, guidance_scale=self.cfg.teacher.guidance_scale)",
           ("tests/test_wiring_eval.py::test_guided_training_uses_uncond_plus_s_times_cond_minus_uncond",)),
    Mutant("prompts-fixed", "each step draws its prompts from (seed, rank, step)", "distill/module.py",
           "picks = torch.randint(0, len(self.prompts), (N,), generator=host_rng)",
           "picks = torch.zeros(N, dtype=torch.long)",
           ("tests/test_t2i.py::test_each_step_draws_its_prompts_from_seed_rank_and_step",)),
    Mutant("lora-saves-base-weights", "with LoRA only the adapters are saved", "distill/module.py",
           'return bool(lora) and key.startswith(lora) and "lora_" not in key', "return False",
           ("tests/test_t2i.py::test_lora_trains_only_the_adapters_saves_only_them_and_resumes_bit_identical",)),
    Mutant("eval-image-size-ignored", "eval.image_size brings decoded images to the extractor's size",
           "distill/module.py", "if size is not None and tuple(images.shape[-2:]) != (size, size):", "if False:",
           ("tests/test_t2i.py::test_in_loop_fid_and_prompt_accuracy_equal_distill_fid_on_the_same_checkpoint",)),
    Mutant("prompt-accuracy-misaligned", "prompt accuracy compares sample i with prompt i mod P",
           "distill/metrics.py", "index = torch.arange(self.next, self.next + len(images)) % len(self.digits)",
           "index = torch.arange(0, len(images)) % len(self.digits)",
           ("tests/test_t2i.py::test_prompt_accuracy_counts_samples_read_as_their_prompts_digit",)),
    Mutant("warmup-ignored", "optim.warmup_steps warms the learning rates up linearly", "distill/module.py",
           "        self._warm_up()\n", "",
           ("tests/test_wiring_module.py::test_learning_rate_warms_up_linearly_then_holds",)),
    Mutant("t2i-teacher-saves-raw-weights", "`distill teacher` (kind t2i) saves its EMA in the pipeline folder",
           "distill/pretrain_t2i.py", "unet=self.ema.net.unet", "unet=self.denoiser.net.unet",
           ("tests/test_teacher_t2i.py::test_a_tiny_run_saves_a_pipeline_that_stock_diffusers_loads_and_samples",)),
    Mutant("export-raw-weights", "distill export writes the EMA weights unless --raw", "distill/export.py",
           "prefix = RAW_PREFIX if raw else EMA_PREFIX", "prefix = EMA_PREFIX if raw else RAW_PREFIX",
           ("tests/test_export.py::test_a_unet_run_exports_a_folder_whose_one_lcm_step_is_the_generator",)),
    # --- data
    Mutant("workers-share-a-stream", "each (rank, worker) streams its own reproducible order", "distill/data.py",
           "seed = wds.utils.make_seed(self.seed, rank, worker)", "seed = wds.utils.make_seed(self.seed)",
           ("tests/test_ddp.py::test_each_rank_and_worker_streams_its_own_reproducible_order",)),
    Mutant("eval-split-read-twice", "the evaluation split is read once across ranks", "distill/data.py",
           "split_stages = [] if every_rank else [wds.split_by_node, wds.split_by_worker]",
           "split_stages = [] if every_rank else [wds.split_by_worker]",
           ("tests/test_ddp.py::test_evaluation_split_is_read_once_across_ranks",)),
    # --- CARV's sampler and FID's arithmetic
    Mutant("strata-iid", "per-sample stratification: u_k = (k + U_k) / K", "distill/carv/sampler.py",
           "return (k + torch.rand(N, K, **kw)) / K", "return torch.rand(N, K, **kw) + 0 * k",
           ("tests/test_carv_sampler.py::test_strata_cover_the_support_exactly_once",)),
    Mutant("frechet-cross-term", "the Frechet distance ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr (S1 S2)^1/2",
           "distill/metrics.py", "- 2.0 * tr_sqrt", "- tr_sqrt",
           ("tests/test_metrics.py::test_fd_commuting_covariances_closed_form",)),
    # --- runs: resume, signals, atomic checkpoints, skipped updates, evaluation cache
    Mutant("resume-takes-any-change", "a changed math key on resume is refused unless allowed", "distill/train.py",
           "refused = [k for k in changed if not k.startswith(FREE_KEYS)",
           "refused = [k for k in () if not k.startswith(FREE_KEYS)",
           ("tests/test_runs.py::test_a_changed_math_key_is_refused_unless_allowed_then_applied_and_recorded",)),
    Mutant("sigterm-succeeds", "SIGTERM stops at a step with its checkpoint and exit status 143", "distill/train.py",
           "EXIT_CODES = {signal.SIGTERM: 143, signal.SIGINT: 130}",
           "EXIT_CODES = {signal.SIGTERM: 0, signal.SIGINT: 130}",
           ("tests/test_runs.py::test_sigterm_and_sigint_stop_at_a_step_with_its_checkpoint_and_a_failure_status",)),
    Mutant("checkpoint-written-in-place", "atomic checkpoints: a kill mid-write leaves the previous one",
           "distill/callbacks/checkpoints.py", 'tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")',
           "tmp = path", ("tests/test_faults.py::test_a_kill_during_the_write_leaves_the_previous_checkpoint",)),
    Mutant("nonfinite-stepped", "an update with a non-finite loss or gradient is skipped", "distill/module.py",
           "optimizer.found_inf = 1.0 - finite", "optimizer.found_inf = 0.0 * finite",
           ("tests/test_faults.py::test_non_finite_updates_are_skipped_counted_and_stop_the_run",)),
    Mutant("fid-cache-ignores-reference", "distill fid reuses a result only for the same reference, seed and protocol",
           "distill/evaluate.py",
           'CACHE_KEY = ("path", "model", "samples", "extractor", "ref_sha", "seed", "teacher_steps", "guidance")',
           'CACHE_KEY = ("path", "model", "samples", "extractor", "teacher_steps", "guidance")',
           ("tests/test_fid_cli.py::test_results_are_keyed_on_reference_content_seed_and_protocol",)),
    Mutant("student-step-per-rank", "every rank trains the same student step (DMD2's backward simulation)",
           "distill/module.py", 'shared = self._step_generator(rank_specific=False, salt=3, device="cpu")',
           'shared = self._step_generator(salt=3, device="cpu")',
           ("tests/test_multistep.py::test_every_rank_trains_the_same_student_step_and_draws_its_own_noise",)),
    Mutant("renoise-reuses-a-draw", "each step of a multi-step student re-noises with fresh noise",
           "distill/teachers/denoiser.py", "x = self.renoise(self.step(x, j - 1, cond), j, noise[:, j - 1])",
           "x = self.renoise(self.step(x, j - 1, cond), j, noise[:, 0])",
           ("tests/test_multistep.py::test_backward_simulation_on_the_exact_mixture_teacher",)),
    Mutant("upstream-cost-one-step", "c_u counts a multi-step student's backward simulation", "distill/module.py",
           "return measure_costs(upstream, inner, N * S, N, self.device)",
           "return measure_costs(upstream, inner, N, N, self.device)",
           ("tests/test_multistep.py::test_the_upstream_cost_counts_backward_simulation",)),
    Mutant("gan-head-untrained", "the discriminator loss trains the GAN head with the fake score", "distill/module.py",
           'loss_f = loss_f + self.cfg.gan.weight_discriminator * metrics["loss/gan_discriminator"]',
           'loss_f = loss_f + 0.0 * metrics["loss/gan_discriminator"]',
           ("tests/test_multistep.py::test_gan_and_multistep_resume_bit_identical_and_log_their_metrics",)),
    # --- benchmark figures (README "Benchmark: gradient variance against compute", "Speed and memory")
    Mutant("elapsed-not-resumed", "time/elapsed_seconds is the training wall time since step 0, across resumes",
           "distill/callbacks/monitors.py", 'self.elapsed = float(state.get("elapsed", 0.0))', "pass",
           ("tests/test_runs.py::test_a_finished_run_rerun_touches_nothing_and_more_steps_continue",)),
    Mutant("bench-whole-chain", "the bench measures a multi-step student at the step training draws",
           "distill/bench.py", "return module.generator(z, cond, noise=module._renoise_draws(N, k, gen), until=k)",
           "return module.generator(z, cond, generator=gen)",
           ("tests/test_bench.py::test_a_multi_step_student_is_benched_at_the_step_training_draws",)),
    Mutant("interval-unpaired", "variance-cut intervals resample the replicates in pairs", "distill/bench.py",
           "ratios.append(trace_of_resamples(G_base, idx) / trace_of_resamples(G, idx))",
           "ratios.append(trace_of_resamples(G_base, idx) / trace_of_resamples(G, idx.roll(1, 0)))",
           ("tests/test_bench_intervals.py::test_a_scaled_copy_has_a_degenerate_interval_at_the_exact_ratio",)),
    Mutant("strata-not-measured", "K auto measures the within-sample variance of the draws training makes",
           "distill/carv/diagnostics.py",
           'return "batch" if sampler.stratify == "global" else sampler.stratify', 'return "none"',
           ("tests/test_auto_k.py::test_the_stratified_within_estimate_is_unbiased_for_the_draws_in_use",
            "tests/test_fake_carv.py::test_the_denoising_variance_split_is_unbiased")),
    Mutant("steps-spread-halved", "K auto counts a multi-step student's spread over its steps",
           "distill/module.py", "steps = 2 * world * (steps - sigma_b2)", "steps = world * (steps - sigma_b2)",
           ("tests/test_auto_k.py::test_the_across_step_term_estimates_the_spread_of_the_mean_gradient_over_student_steps",)),
    Mutant("strata-ignored-by-k", "K auto chooses K from the stratified within-sample variance",
           "distill/carv/controller.py", "a, b = within_model(max(self.sigma_w2, 0.0), self.sigma_w2_strat, self.strat_K)",
           "a, b = max(self.sigma_w2, 0.0), 0.0",
           ("tests/test_auto_k.py::test_the_controller_counts_strata_and_the_spread_over_student_steps",)),
    Mutant("fake-unweighted", "CARV on the fake-score update estimates DMD2's loss without bias",
           "distill/module.py", "loss = (w.to(per.dtype) * per).mean()", "loss = per.mean()",
           ("tests/test_fake_carv.py::test_weighted_stratified_draws_estimate_dmd2s_loss_without_bias",)),
    Mutant("fake-proposal-not-resumed", "a resumed run with CARV on the fake score ends bit-identical",
           "distill/module.py", 'self.fake_sampler.load_state_dict(state["fake_sampler"])', "pass",
           ("tests/test_fake_carv.py::test_an_adaptive_fake_proposal_is_checkpointed_and_a_resumed_run_ends_bit_identical",)),
    Mutant("fake-within-halved", "fake_score.K auto measures the denoising gradient's variance split without bias",
           "distill/carv/diagnostics.py", "within = N / 4 * 0.5 *", "within = N / 4 * 0.25 *",
           ("tests/test_fake_carv.py::test_the_denoising_variance_split_is_unbiased",)),
    Mutant("fake-k-not-chosen", "fake_score.K auto applies the K its accounting chooses",
           "distill/module.py", 'self.fake_k.choose(N, *self._cost_pair("fake_"))', "self.fake_k.K",
           ("tests/test_fake_carv.py::test_fake_k_auto_measures_chooses_and_logs",)),
    Mutant("fake-k-not-resumed", "a resumed run with fake_score.K auto ends bit-identical",
           "distill/module.py", 'self.fake_k.load_state_dict(state["fake_k"])', "pass",
           ("tests/test_fake_carv.py::test_an_adaptive_fake_proposal_is_checkpointed_and_a_resumed_run_ends_bit_identical",)),
)



def _files() -> list[str]:
    """The repository's files as a fresh clone has them, plus new files not yet committed (never ignored ones)."""
    out = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=REPO,
                         capture_output=True, text=True, check=True).stdout
    return [f for f in out.split("\0") if f and (REPO / f).is_file()]


def _copy(dest: Path) -> None:
    for f in _files():
        (dest / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO / f, dest / f)


def check_text(m: Mutant) -> str | None:
    """None if the replacement applies exactly once, else what is wrong."""
    text = (REPO / m.path).read_text()
    n = text.count(m.old)
    if n != 1:
        return f"{m.path}: the text to replace occurs {n} times, expected exactly once (the list is stale)"
    if m.old == m.new:
        return "the replacement changes nothing"
    return None


def run_mutant(m: Mutant, copy: Path, timeout: float) -> dict:
    problem = check_text(m)
    if problem is not None:
        return {"name": m.name, "status": "stale", "detail": problem, "seconds": 0.0}
    target = copy / m.path
    original = target.read_text()
    target.write_text(original.replace(m.old, m.new, 1))
    env = dict(os.environ, PYTHONPATH=str(copy), PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-m", "not slurm", *m.tests]
    start = time.perf_counter()
    try:
        r = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True, timeout=timeout)
        code, tail = r.returncode, (r.stdout + r.stderr).strip().splitlines()[-3:]
    except subprocess.TimeoutExpired:
        code, tail = None, [f"timed out after {timeout:.0f} s"]
    finally:
        target.write_text(original)
    seconds = time.perf_counter() - start
    # pytest: 0 all passed, 1 some failed, 2 interrupted, 3 internal error, 4 usage error, 5 nothing collected
    status = {0: "survived", 1: "killed"}.get(code, "error")
    return {"name": m.name, "status": status, "exit": code, "seconds": round(seconds, 1), "detail": " | ".join(tail)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--list", action="store_true", help="print the mutants and their killing tests, run nothing")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="run these mutants only")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per mutant before it counts as an error [600]")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)

    chosen = [m for m in MUTANTS if not args.only or m.name in args.only]
    unknown = set(args.only or ()) - {m.name for m in MUTANTS}
    if unknown:
        print(f"mutants: unknown name(s) {', '.join(sorted(unknown))}; expected one of "
              f"{', '.join(m.name for m in MUTANTS)}", file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.name}\n  breaks:  {m.promise}\n  in:      {m.path}\n  killed by: {' '.join(m.tests)}")
        return 0

    results = []
    with tempfile.TemporaryDirectory(prefix="distill-mutants-") as tmp:
        copy = Path(tmp)
        _copy(copy)
        print(f"{len(chosen)} mutants, each against its tests, on a copy in {copy}", flush=True)
        for i, m in enumerate(chosen, 1):
            r = run_mutant(m, copy, args.timeout)
            results.append(r)
            print(f"[{i:2d}/{len(chosen)}] {r['status']:8s} {r['seconds']:7.1f} s  {m.name}", flush=True)
            if r["status"] != "killed":
                print(f"           {r['detail']}", flush=True)
    killed = sum(r["status"] == "killed" for r in results)
    print(f"\n{killed} of {len(results)} mutants killed"
          + ("" if killed == len(results) else f"; not killed: "
             f"{', '.join(r['name'] + ' (' + r['status'] + ')' for r in results if r['status'] != 'killed')}"))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "killed": killed, "total": len(results)},
                                              indent=2) + "\n")
    return 0 if killed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
