"""The trigger-weighted objective of Streaming-Train.

Every supervised decision position gets a weight by its role (:func:`streamharness.train.convert.roles_of`):

* ``first_silence`` — the first ``</silence>`` of a run (at the start, or right after a response): 1.0
* ``repeated_silence`` — every further ``</silence>`` of the run: 0.8
* ``response`` — the response onset, the ``</response>`` token: 1.5

(the paper's defaults, settings ``SH_TRAIN_WEIGHT_*``). Where a generator is trained, the response
text's tokens get the LM loss with weight ``SH_TRAIN_LM_WEIGHT``. The loss is the weighted sum of
per-position cross-entropies divided either by the **number of supervised positions**
(``normalise="positions"``, the paper's, the default) or by the **sum of the weights**
(``normalise="weights"``, what a public weighted-SFT hook does).

The default is the paper's: dividing by the count keeps the weights meaningful in absolute terms —
a response onset then counts 1.5× an ordinary token, whatever the silence/response mix of the
batch — while dividing by the weights' sum rescales each batch back to a weighted mean, so that a
batch of mostly repeated silence (weight 0.8) is pushed as hard as one of onsets; that undoes part
of what down-weighting repeated silence is for. Both are the same with uniform weights.

Batches carry per-token ``loss_weights`` beside ``labels`` (``-100`` = not supervised);
:func:`shift_for_causal_lm` shifts both the same way so that logits at ``i`` are scored against
the token at ``i + 1``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

IGNORE_INDEX = -100


class TriggerWeights(BaseSettings):
    """Weights and normalisation of the trigger loss."""

    model_config = SettingsConfigDict(env_prefix="SH_TRAIN_", frozen=True, extra="forbid", case_sensitive=False)

    weight_first_silence: float = Field(1.0, ge=0, le=100, description="Trigger-loss weight of the first </silence> of a run (the paper: 1.0).")
    weight_repeated_silence: float = Field(0.8, ge=0, le=100, description="Trigger-loss weight of a repeated </silence> (the paper: 0.8; its ablation sweeps 0.2 / 0.5 / 0.8).")
    weight_response: float = Field(1.5, ge=0, le=100, description="Trigger-loss weight of the response onset, </response> (the paper: 1.5).")
    lm_weight: float = Field(1.0, ge=0, le=100, description="Weight of the LM loss on response-text tokens (VLM trainer).")
    normalise: Literal["positions", "weights"] = Field("positions", description="Divide the weighted loss by the number of supervised positions (the paper's) or by the sum of the weights.")

    def of(self, role: str) -> float:
        """The weight of one decision role."""
        try:
            return {"first_silence": self.weight_first_silence, "repeated_silence": self.weight_repeated_silence,
                    "response": self.weight_response}[role]
        except KeyError:
            raise ValueError(f"unknown role {role!r}: first_silence, repeated_silence or response") from None

    @classmethod
    def uniform(cls) -> TriggerWeights:
        return cls(weight_first_silence=1.0, weight_repeated_silence=1.0, weight_response=1.0)


def role_weights(roles: Sequence[str], weights: TriggerWeights) -> np.ndarray:
    """float32 weight per decision position."""
    return np.asarray([weights.of(r) for r in roles], dtype=np.float32)


def normaliser(loss_weights, labels, normalise: str):
    """The denominator: supervised positions (``labels != -100``), or the sum of their weights."""
    import torch

    mask = labels != IGNORE_INDEX
    if normalise == "positions":
        return mask.sum().clamp(min=1).to(torch.float32)
    if normalise == "weights":
        return (loss_weights * mask).sum().clamp(min=1e-8).to(torch.float32)
    raise ValueError(f"normalise must be 'positions' or 'weights', got {normalise!r}")


def weighted_token_loss(logits, labels, loss_weights, normalise: str = "positions"):
    """Σ wᵢ·CE(logitsᵢ, labelsᵢ) / (supervised positions | Σ wᵢ). ``logits`` (…, V); ``labels`` and
    ``loss_weights`` (…) already aligned with the logits (see :func:`shift_for_causal_lm`)."""
    import torch.nn.functional as F

    flat_logits = logits.reshape(-1, logits.shape[-1]).float()
    flat_labels = labels.reshape(-1)
    flat_w = loss_weights.reshape(-1).float()
    ce = F.cross_entropy(flat_logits, flat_labels, ignore_index=IGNORE_INDEX, reduction="none")
    mask = (flat_labels != IGNORE_INDEX).float()
    return (ce * flat_w * mask).sum() / normaliser(flat_w, flat_labels, normalise)


def weighted_decision_loss(logits, targets, loss_weights, normalise: str = "positions"):
    """The same objective for a binary decision head: ``logits`` (N,) of "respond", ``targets`` (N,)
    in {0, 1}, or ``-100`` where a position is not supervised; cross-entropy of two classes."""
    import torch
    import torch.nn.functional as F

    targets = targets.reshape(-1)
    mask = targets != IGNORE_INDEX
    safe = torch.where(mask, targets, torch.zeros_like(targets)).float()
    ce = F.binary_cross_entropy_with_logits(logits.reshape(-1).float(), safe, reduction="none")
    w = loss_weights.reshape(-1).float()
    return (ce * w * mask.float()).sum() / normaliser(w, targets, normalise)


def shift_for_causal_lm(labels, loss_weights):
    """``labels[:, 1:]`` and ``loss_weights[:, 1:]``, padded with -100 / 0 at the end, so that
    position ``i`` of the logits is scored against token ``i + 1`` with that token's weight."""
    import torch

    pad_l = torch.full_like(labels[:, :1], IGNORE_INDEX)
    pad_w = torch.zeros_like(loss_weights[:, :1])
    return torch.cat([labels[:, 1:], pad_l], dim=1), torch.cat([loss_weights[:, 1:], pad_w], dim=1)
