"""Evaluation: the student on the test split against its teachers (evaluate), the MTP drafters' figures
(mtp_eval, whose timing runs in a child `python -m distill.eval.mtp_eval`), the linear probes (probes) and
the report and its plots (report)."""

from distill.faces import face

EXPORTS = {
    "evaluate": ("evaluate_run", "evaluate_student", "load_eval_data", "resolve_student", "folder_cross",
                 "grounded_positions", "teacher_caption_nll", "agreement_and_kl", "exported_dtype"),
    "probes": ("probes",),
    "batches": ("eval_batches",),
    "mtp_eval": ("mtp_prompts", "mtp_figures", "mtp_figures_in_child", "speculative_figures", "default_mkl_env"),
    # its `report` function keeps its module's name: `from distill.eval.report import report`
    "report": ("eval_plots", "teacher_note", "better", "verdict", "LOWER_IS_BETTER", "REFERENCE"),
}
__all__ = [name for names in EXPORTS.values() for name in names]
__getattr__, __dir__ = face(__name__, EXPORTS)
