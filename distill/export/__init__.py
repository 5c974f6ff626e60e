"""Export: the student folder's model card (card), its MLflow pyfunc (student_pyfunc, logged from code) and its
publication to the MLflow Model Registry (publish)."""

from distill.faces import face

EXPORTS = {
    "card": ("finish_student", "write_card", "model_card", "parameter_count"),
    "publish": ("publish_student", "registered_name", "is_champion", "signature", "input_example", "MODEL_NAME"),
}
__all__ = [name for names in EXPORTS.values() for name in names]
__getattr__, __dir__ = face(__name__, EXPORTS)
