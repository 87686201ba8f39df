"""What the project's `evaluate` caption modules share (``metrics/<name>/<name>.py``).

- **Missing captions.** A prediction may be ``None`` (an image the captioner gave no caption) in
  ``compute``, ``add`` and ``add_batch``: it is stored as a null and each module counts it as wrong
  (retrieval) or empty (CIDEr-D, BLEU) and reports it in ``missing``. Stock ``evaluate`` modules
  reject a ``None`` string input (evaluate 0.4.6 checks the type of the first value of each batch).
- **Composition.** ``evaluate.combine([...]).compute(**kwargs)`` passes every keyword argument to
  every module. A module therefore ignores the keyword arguments its ``_compute`` does not take
  (``cider_d`` ignores ``images`` and ``bags``; ``truematch`` ignores ``references``), naming
  them in an info-level log line.

Every module folder holds this file as a symbolic link to ``metrics/caption_metric.py`` (as for
``clip_judge.py``), imported relatively, so that ``evaluate.load`` copies it into its cache; it
imports only ``evaluate``.
"""

import abc
import inspect

import evaluate

logger = evaluate.logging.get_logger(__name__)

__all__ = ["CaptionMetric", "split_missing"]


class CaptionMetric(evaluate.Metric, metaclass=abc.ABCMeta):
    """An `evaluate.Metric` whose ``predictions`` may hold ``None`` (missing captions) and whose
    ``compute`` ignores keyword arguments meant for other modules of an ``evaluate.combine``.

    Abstract (``_info`` and ``_compute``), so that ``evaluate.load`` takes the module's own class
    and not this one (it picks the first concrete `EvaluationModule` of the script).
    """

    @abc.abstractmethod
    def _info(self) -> evaluate.MetricInfo:
        """The module's `evaluate.MetricInfo`."""

    @abc.abstractmethod
    def _compute(self, predictions, **kwargs) -> dict:
        """The scores; ``predictions`` may hold ``None`` (see `split_missing`)."""

    def compute(self, *, predictions=None, references=None, **kwargs):
        """evaluate's `compute`, keeping only the keyword arguments this module's `_compute` takes
        (a module without a ``references`` input that wants them renames them first)."""
        inputs = {"predictions": predictions}
        if "references" in self._feature_names():
            inputs["references"] = references
        elif references is not None:
            kwargs["references"] = references  # not an input of this module: ignored below
        parameters = inspect.signature(self._compute).parameters
        ignored = sorted(k for k in kwargs if k not in parameters or k == "references")
        if ignored:
            logger.info(f"{self.name} ignores the arguments {ignored} (not among its inputs).")
        return super().compute(**inputs, **{k: v for k, v in kwargs.items() if k not in ignored})

    def _enforce_nested_string_type(self, schema, obj):
        """evaluate's input type check, where ``None`` (a missing caption) passes as a null string."""
        if obj is None:
            return None
        return super()._enforce_nested_string_type(schema, obj)


def split_missing(predictions) -> tuple[list[str], list[bool]]:
    """(captions with ``None`` replaced by ``""``, mask of the missing ones)."""
    predictions = list(predictions)
    return ["" if p is None else p for p in predictions], [p is None for p in predictions]
