"""Streaming-Train: per-second streaming training data, the trigger-weighted objective, and the
trainers (a decision head served on Triton, and LoRA fine-tuning of a Hugging Face VLM).

Modules: :mod:`.samples` (the one form every reader produces), :mod:`.readers` (annotation
formats → samples), :mod:`.synthetic` (procedural streams with exact ground truth),
:mod:`.convert` (a sample → per-second steps), :mod:`.dataset` (the sharded Parquet builder),
:mod:`.objective` (the trigger loss), :mod:`.head` and :mod:`.vlm` (the trainers), :mod:`.cli`
(``streamharness train …``). See docs/training.md.
"""
