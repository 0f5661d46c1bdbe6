"""rbees: LLM inference on a fleet of your own machines."""

__version__ = "0.1.0"
