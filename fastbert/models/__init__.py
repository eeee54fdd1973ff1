"""BERT on fastbert's fused kernels, loading and saving Hugging Face checkpoints."""

from fastbert.models.bert import (
    BertForMaskedLM,
    BertForPreTraining,
    BertForSequenceClassification,
    BertModel,
    count_parameters,
)
from fastbert.models.config import PRESETS, BertConfig

__all__ = [
    "BertConfig",
    "BertForMaskedLM",
    "BertForPreTraining",
    "BertForSequenceClassification",
    "BertModel",
    "PRESETS",
    "count_parameters",
]
