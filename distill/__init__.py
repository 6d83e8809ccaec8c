"""distill: one-step diffusion distillation (DMD/DMD2) with the CARV hierarchical Monte Carlo estimator."""

__version__ = "0.1.0"
