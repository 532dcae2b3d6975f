"""Activation tracing: in memory (:func:`trace`), streamed to disk (:func:`trace_dataset`), and read
back (:class:`TraceReader`).

Captures happen after interventions (steering hooks are prepended, tracing hooks appended), so a
trace shows what the model computed under the active steering.
"""

from .dataset import TraceSummary, trace_dataset
from .format import CorruptShardError, TraceConfigError
from .memory import TraceCache, trace
from .reader import ShardInfo, TraceReader

__all__ = [
    "CorruptShardError",
    "ShardInfo",
    "TraceCache",
    "TraceConfigError",
    "TraceReader",
    "TraceSummary",
    "trace",
    "trace_dataset",
]
