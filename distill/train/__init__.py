"""Training: the recipe (the loop, `python -m distill.train.recipe` under torchrun), its objective, the stages,
the DeepSpeed engine, the launcher, the student's vocabulary, the on-policy rounds and the training plots."""

from distill.faces import face

EXPORTS = {
    "recipe": ("DistillRecipe", "NonFiniteLossError", "CheckpointsExistError", "TrainingStopped", "stop_signals"),
    "objective": ("DistillObjective", "balancer_options", "term_metric"),
    "stages": ("Stage", "resolve_stages", "part_of", "freeze_for", "stage_student", "TERMS", "PARTS"),
    "engine": ("build_engine", "init_distributed", "deepspeed_config", "FiniteAdamW", "param_groups", "lr_factor",
               "save", "load_latest", "verify_checkpoint", "UnsafeCheckpointError", "consolidated_state_dict",
               "export_student", "free_port", "RANK_VARS"),
    "launch": ("run_training", "launcher_command"),
    "student_vocab": ("StudentVocab", "teacher_tokenizer", "STUDENT_TOKENIZER"),  # and its student_vocab()
    "onpolicy": ("prompt_rows", "continue_captions", "write_continuations", "generations", "onpolicy_kl",
                 "round_config"),
    "plots": ("training_plots",),
}
__all__ = [name for names in EXPORTS.values() for name in names]
__getattr__, __dir__ = face(__name__, EXPORTS)
