"""Synthetic tasks and real-text corpora for training and evaluating memory (see each module)."""
from .corpus import END_OF_TEXT, TokenCorpus, stdlib_documents, stdlib_modules, stdlib_tokenizer
from .recall import (
    FACT_TEMPLATES,
    FILLERS,
    QUESTION_TEMPLATES,
    SPLITS,
    TEMPLATES,
    RecallBatch,
    RecallTask,
    composed_templates,
    filler_files,
    filler_token_pool,
    filler_windows,
)

__all__ = [
    "END_OF_TEXT", "TokenCorpus", "stdlib_documents", "stdlib_modules", "stdlib_tokenizer",
    "FACT_TEMPLATES", "FILLERS", "QUESTION_TEMPLATES", "SPLITS", "TEMPLATES", "RecallBatch", "RecallTask",
    "composed_templates", "filler_files", "filler_token_pool", "filler_windows",
]
