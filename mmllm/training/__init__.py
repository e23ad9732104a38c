"""LLaVA-style two-stage training with NExT-GPT decoding alignment, on accelerate.

* ``TrainConfig``: every setting, as data.
* ``set_trainable(model, stage)``: the one place that decides what learns.
* ``train(config)`` / ``Trainer``: the loop (accelerate: mixed precision, accumulation, DDP/FSDP/DeepSpeed,
  atomic checkpoints, exact resume, TensorBoard, evaluation hook, NaN handling).
* ``StreamingData``, ``ExampleBuilder``, ``Collator``: streamed data with lazy media and label masks.
* ``build_feature_cache`` / ``FeatureCache``: precomputed frozen encoder outputs and decoder targets.
* ``align_output_projectors``: the output projectors alone, trained fast on cached LLM states.
"""

from .align import (AlignResult, SignalCache, align_output_projectors, cache_signal_states, signal_states_of_rows,
                    step_schedule)
from .cache import FeatureCache, build_feature_cache
from .collate import Collator, TrainBatch
from .config import STAGES, TrainConfig
from .data import (DataError, DataReport, ExampleBuilder, Source, StreamingData, assistant_char_spans,
                   conversation_labels, sources_from)
from .freeze import parameter_counts, parameter_table, set_trainable, trainable_rule
from .losses import TrainingModule
from .trainer import Trainer, TrainResult, latest_checkpoint, load_model, resolve_model_path, train

__all__ = [
    "AlignResult", "SignalCache", "align_output_projectors", "cache_signal_states", "signal_states_of_rows",
    "step_schedule",
    "STAGES", "TrainConfig", "set_trainable", "trainable_rule", "parameter_counts", "parameter_table",
    "Trainer", "TrainResult", "train", "load_model", "resolve_model_path", "latest_checkpoint",
    "StreamingData", "ExampleBuilder", "Source", "sources_from", "DataReport", "DataError",
    "assistant_char_spans", "conversation_labels", "Collator", "TrainBatch", "TrainingModule",
    "FeatureCache", "build_feature_cache",
]
