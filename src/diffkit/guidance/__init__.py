"""Guidance as denoiser transforms: every method wraps a denoiser and is one (see `diffkit.guidance.base`)."""

from .base import GuidedDenoiser, batched_call, expand_cond, scale_at
from .cfg import CFG, AdaptiveGuidance, CFGPlusPlus, LinearAG, fit_linear_ag, null_cond
from .classifier import (
    ClassifierGuidance,
    GradientFreeGuidance,
    LossGuidance,
    MinorityGuidance,
    classifier_grad,
    minority_score,
    native_classifier,
)
from .pag import PAG, attention_layers

__all__ = ["GuidedDenoiser", "batched_call", "expand_cond", "scale_at"]
__all__ += ["CFG", "CFGPlusPlus", "AdaptiveGuidance", "LinearAG", "fit_linear_ag", "null_cond"]
__all__ += ["ClassifierGuidance", "GradientFreeGuidance", "LossGuidance", "MinorityGuidance", "classifier_grad",
            "minority_score", "native_classifier"]
__all__ += ["PAG", "attention_layers"]
