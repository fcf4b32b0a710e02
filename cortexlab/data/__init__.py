"""Synthetic tasks and real-text corpora for training and evaluating memory (see each module)."""
from .recall import (
    FACT_TEMPLATES,
    FILLERS,
    QUESTION_TEMPLATES,
    SPLITS,
    RecallBatch,
    RecallTask,
    filler_files,
    filler_token_pool,
)

__all__ = [
    "FACT_TEMPLATES", "FILLERS", "QUESTION_TEMPLATES", "SPLITS", "RecallBatch", "RecallTask", "filler_files",
    "filler_token_pool",
]
