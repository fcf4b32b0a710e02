"""cortexlab: brain-inspired memory and attention for language models."""
__version__ = "0.1.0"
