"""Task evaluation: datasets, multiple-choice / yes-no scoring, statistics, open-answer grading."""

from .tasks import DatasetError, EvalResult, EvaluationError, evaluate, load_dataset, split, task_kind

__all__ = ["DatasetError", "EvalResult", "EvaluationError", "evaluate", "load_dataset", "split", "task_kind"]
