"""Cross-entropy and knowledge-distillation losses: plain functions, ``nn.Module`` wrappers, the chunked objective.

See ``docs/losses.md`` for the formulas, the temperature convention and when to use which.
"""

from kdtune.losses.functional import (
    cross_entropy_sum,
    forward_kl,
    forward_kl_per_token,
    generalized_jsd,
    generalized_jsd_per_token,
    reverse_kl,
    reverse_kl_per_token,
    skew_forward_kl,
    skew_forward_kl_per_token,
    skew_reverse_kl,
    skew_reverse_kl_per_token,
    symmetric_kl,
    symmetric_kl_per_token,
    total_variation,
    total_variation_per_token,
)
from kdtune.losses.kd import (
    CEWithChunkedOutputLoss,
    CrossEntropyLoss,
    ForwardKLLoss,
    ForwardKLWithChunkedOutputLoss,
    JSDLoss,
    KDLoss,
    ReverseKLLoss,
    SkewForwardKLLoss,
    SkewReverseKLLoss,
    SymmetricKLLoss,
    TVDLoss,
)
from kdtune.losses.objective import ObjectiveOutput, cross_entropy_objective, distillation_objective

__all__ = [
    "CEWithChunkedOutputLoss",
    "CrossEntropyLoss",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "JSDLoss",
    "KDLoss",
    "ObjectiveOutput",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "SymmetricKLLoss",
    "TVDLoss",
    "cross_entropy_objective",
    "cross_entropy_sum",
    "distillation_objective",
    "forward_kl",
    "forward_kl_per_token",
    "generalized_jsd",
    "generalized_jsd_per_token",
    "reverse_kl",
    "reverse_kl_per_token",
    "skew_forward_kl",
    "skew_forward_kl_per_token",
    "skew_reverse_kl",
    "skew_reverse_kl_per_token",
    "symmetric_kl",
    "symmetric_kl_per_token",
    "total_variation",
    "total_variation_per_token",
]
