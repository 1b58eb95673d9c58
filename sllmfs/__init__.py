"""sllmfs: a model cache that makes LLM cold starts as fast as the hardware allows."""

__version__ = "0.1.0"
