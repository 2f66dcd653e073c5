"""dmpq-compile: compile Mixture-of-Experts models to per-expert mixed-precision artifacts."""

__version__ = "0.1.0"
