"""qbench: measure what quantization really costs an LLM."""

__version__ = "0.1.0"
