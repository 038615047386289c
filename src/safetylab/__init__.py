"""safetylab: rerun empirical AI-safety claims as studies with controls, seeds and intervals."""

__version__ = "0.1.0"
