"""The losses: the language teacher's targets as the losses read them (targets), the language KD and its one
term plan (language) with its chunked head (chunked) and the cross-tokenizer ULD (xtoken), the vision KD and
the contrastive term (image), the drafters' loss (drafters) and the balancing of the terms (balance)."""

from distill.faces import face

EXPORTS = {
    "targets": ("SparseTargets", "LOGPROB_FLOOR", "GATES", "shift_targets", "teacher_entropy", "kd_gate_keep",
                "kd_position_weights"),
    "language": ("LanguageDistillLoss", "LossTerm", "language_kd_loss", "causal_ce_loss", "DIVERGENCES", "KINDS"),
    "chunked": ("chunked_language_loss",),
    "xtoken": ("uld_loss",),
    "image": ("vision_kd_loss", "siglip_loss", "same_caption"),
    "drafters": ("drafter_loss", "greedy_captions"),
    "balance": ("build_balancer", "TrunkTaps", "gradnorm_ratios", "distributed_mean", "StaticBalancer",
                "EMABalancer", "UncertaintyBalancer", "GradNormBalancer", "BALANCERS", "STRATEGIES"),
}
__all__ = [name for names in EXPORTS.values() for name in names]
__getattr__, __dir__ = face(__name__, EXPORTS)
