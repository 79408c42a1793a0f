"""odb: online dynamic batching for LLM and VLM fine-tuning.

Wrap a DataLoader whose dataset returns processed single samples; odb measures each sample
after the user's pipeline, packs samples into batches under a token budget, and yields
batches ready for ``model(**batch)`` with a :class:`StepInfo` for exact loss scaling.
"""

from odb.batch import Batch, StepInfo, step_info
from odb.collate import PackedCollator, PaddedCollator
from odb.cost import Budget, Caps, ComputeCost, PackedCost, PaddedCost, SampleSize, measure_sample
from odb.errors import (
    AlignmentError,
    BatchTypeError,
    ConfigError,
    OdbError,
    OverBudgetError,
    SampleError,
    SampleTypeError,
    StateError,
)
from odb.loader import DataLoader, wrap
from odb.loss import scale_loss
from odb.stats import LoaderStats

from odb import attention, estimate  # isort: skip  (``odb.estimate.count_steps`` after ``import odb``)

__all__ = [
    "Batch",
    "BatchTypeError",
    "AlignmentError",
    "Budget",
    "Caps",
    "ComputeCost",
    "ConfigError",
    "DataLoader",
    "LoaderStats",
    "OdbError",
    "OverBudgetError",
    "PackedCollator",
    "PackedCost",
    "PaddedCollator",
    "PaddedCost",
    "SampleError",
    "SampleSize",
    "SampleTypeError",
    "StateError",
    "StepInfo",
    "attention",
    "estimate",
    "measure_sample",
    "step_info",
    "scale_loss",
    "wrap",
]

__version__ = "0.1.0"
