"""CARV: the hierarchical Monte Carlo estimator of the DMD gradient (docs/method.md §4–§7) — timestep proposals,
stratified draws, variance and compute accounting. Imports torch only, so it is usable without Lightning or a GPU."""

from distill.carv.accounting import (anova, cost, ecm, ecm_oracle, k_star, optimal_k, split_half,
                                     variance)
from distill.carv.measure import count_flops, time_call
from distill.carv.sampler import TimestepSampler, dmd_timestep_p

__all__ = ["TimestepSampler", "dmd_timestep_p", "anova", "split_half", "variance", "cost", "k_star", "optimal_k",
           "ecm", "ecm_oracle", "count_flops", "time_call"]
