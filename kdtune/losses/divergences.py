"""The KD divergences as config components: one small class each, with one method, ``per_token``.

A divergence compares the student's and the teacher's distributions at each trained position. It receives
log-probabilities over a shared support, already tempered by the objective (``log_softmax(logits / T)``), and returns
the divergence per position. Temperature, the T² factor, masking, chunking and mixing with the cross-entropy belong to
:class:`kdtune.losses.DistillationObjective`; a divergence never sees them, so none can apply them twice.

Adding one::

    class HellingerLoss(Divergence):
        def per_token(self, student_logp, teacher_logp):          # [n, K], [n, K] -> [n]
            return 1 - (0.5 * (student_logp + teacher_logp)).exp().sum(-1)

and name it in a config: ``kd_loss: {_component_: my_module.HellingerLoss}``. See docs/adding_a_loss.md.
"""

from __future__ import annotations

from torch import Tensor

from kdtune.losses import functional as KF

__all__ = [
    "Divergence",
    "ForwardKLLoss",
    "ForwardKLWithChunkedOutputLoss",
    "JSDLoss",
    "ReverseKLLoss",
    "SkewForwardKLLoss",
    "SkewReverseKLLoss",
    "SymmetricKLLoss",
    "TVDLoss",
]


class Divergence:
    """Base of the KD divergences: a subclass implements :meth:`per_token` and nothing else.

    Subclasses that define ``forward``, ``__call__`` or ``loss_sum`` are refused when the class is created: the
    objective only ever calls ``per_token``, so such a method would be silently ignored.
    """

    _RESERVED = ("forward", "__call__", "loss_sum")

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        for name in cls._RESERVED:
            if name in cls.__dict__:
                raise TypeError(
                    f"{cls.__name__} defines {name}(), which kdtune never calls: a divergence implements only "
                    "per_token(student_logp, teacher_logp) -> [n] (see docs/adding_a_loss.md)"
                )

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        """Divergence at every position.

        Args:
            student_logp: ``[n, K]`` student log-probabilities (tempered, differentiable).
            teacher_logp: ``[n, K]`` teacher log-probabilities over the same support (tempered, no gradient).

        Returns:
            ``[n]``, without the T² factor.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement per_token(student_logp, teacher_logp)")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class ForwardKLLoss(Divergence):
    """Forward KL ``KL(p_t‖p_s)`` (mean-seeking; the classic KD loss of Hinton et al. 2015).

    The teacher's entropy is included, so the logged value is a true KL (0 when the distributions agree); torchtune's
    ``ForwardKLLoss`` logs only the cross-entropy part ``−Σ p_t log p_s``. The gradient is the same.
    """

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.forward_kl(student_logp, teacher_logp)


#: torchtune's name, for configs migrated from it (chunking is the objective's ``num_output_chunks``).
ForwardKLWithChunkedOutputLoss = ForwardKLLoss


class ReverseKLLoss(Divergence):
    """Reverse KL ``KL(p_s‖p_t)`` (mode-seeking; MiniLLM, GKD)."""

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.reverse_kl(student_logp, teacher_logp)


class SymmetricKLLoss(Divergence):
    """Symmetric (Jeffreys) KL ``KL(p_t‖p_s) + KL(p_s‖p_t)``."""

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.symmetric_kl(student_logp, teacher_logp)


class JSDLoss(Divergence):
    """Generalised Jensen-Shannon divergence JSD(β), ``M = β p_t + (1 − β) p_s`` (GKD's default family).

    Args:
        beta: interpolation weight in [0, 1]; β = 0 is forward KL, β = 1 reverse KL.
        normalize: divide by ``β (1 − β)`` so the family is continuous at its ends; False = TRL's convention.
    """

    def __init__(self, beta: float = 0.5, normalize: bool = True) -> None:
        self.beta = KF.check_fraction("beta", beta)
        self.normalize = bool(normalize)

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.generalized_jsd(student_logp, teacher_logp, self.beta, self.normalize)


class SkewForwardKLLoss(Divergence):
    """Skew forward KL ``KL(p_t ‖ α p_t + (1 − α) p_s)`` (DistiLLM); α in [0, 1), α = 0 is forward KL."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = KF.check_fraction("alpha", alpha, allow_one=False)

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.skew_forward_kl(student_logp, teacher_logp, self.alpha)


class SkewReverseKLLoss(Divergence):
    """Skew reverse KL ``KL(p_s ‖ α p_s + (1 − α) p_t)`` (DistiLLM); α in [0, 1), α = 0 is reverse KL."""

    def __init__(self, alpha: float = 0.1) -> None:
        self.alpha = KF.check_fraction("alpha", alpha, allow_one=False)

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.skew_reverse_kl(student_logp, teacher_logp, self.alpha)


class TVDLoss(Divergence):
    """Total variation distance ``½ Σ |p_t − p_s|``."""

    def per_token(self, student_logp: Tensor, teacher_logp: Tensor) -> Tensor:
        return KF.total_variation(student_logp, teacher_logp)
