"""CIDEr-D and BLEU-1..4 exactly as pycocoevalcap computes them, without Java (an `evaluate` module).

The scores are those of the COCO caption evaluation code (pycocoevalcap: Java PTB tokenizer,
``Cider``, ``Bleu(4)``), reproduced in Python: ``metrics/ptb_tokenizer.py`` (the same PTB lexer),
``metrics/cider.py`` (vectorised CIDEr-D, Vedantam et al., CVPR 2015) and ``metrics/bleu.py``.
NDLB (Gaur et al.) reports BLEU-4 and CIDEr (Sec. 4.2; Tables 3-5 and 7) and uses CIDEr-D as an RL
reward (Sec. 4.8, App. C.4).

The PTB tokenizer reads the tables of its automaton at run time from the jar that the installed
``pycocoevalcap`` package ships (``pycocoevalcap==1.2`` is therefore a requirement of this module;
Java is not): nothing derived from CoreNLP (GPL) is part of this module or of the NDLB repository.
The ``import pycocoevalcap`` line below makes ``evaluate.load`` name that requirement if it is missing.

One implementation, self-contained folder: ``cider.py``, ``bleu.py``, ``ptb_tokenizer.py``,
``ptb_lexer_tables.py`` and ``caption_metric.py`` (what the project's modules share: ``None`` =
missing caption, arguments of other modules of an ``evaluate.combine`` ignored) in this folder are
*symbolic links* to ``../<name>.py`` (git stores them as links). This script imports each of them
with a relative import at the start of a line (``from .cider import cider_d``), which is what
``evaluate`` looks for: ``evaluate.load`` then copies the files into its module cache
(``shutil.copyfile`` follows the links, so the copies hold the real code) and the copies import each other relatively as siblings, exactly as ``metrics/*.py`` do inside
the ``metrics`` package. ``huggingface_hub.upload_folder`` also follows the links, so a Hub
repository gets the real files. Nothing is imported from the repository at run time.
Rules for such a script: put no comment on an import line (evaluate would read it as a download URL,
or as the pip requirement of a library import), and import every sibling file from here (evaluate
copies direct imports only).
"""

import datasets
import evaluate
import numpy as np
import pycocoevalcap

from .bleu import bleu
from .caption_metric import CaptionMetric, split_missing
from .cider import CiderD as CiderDScorer
from .cider import cider_d
from .ptb_lexer_tables import load_tables
from .ptb_tokenizer import ptb_tokenize

# imported above so that evaluate checks for pycocoevalcap (the tokenizer reads its jar) and copies
# the table loader next to this script
_REQUIREMENTS = (pycocoevalcap, load_tables)

# A vendored copy of publishing.citations.bibtex(*METRIC_CITATIONS["cider_d"]) (this module loads
# standalone); tests/test_citations.py checks that the two are equal.
_CITATION = """\
@inproceedings{vedantam2015cider,
  title     = {CIDEr: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {CVPR},
  year      = {2015}
}
@inproceedings{papineni2002bleu,
  title     = {BLEU: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {ACL},
  year      = {2002}
}
@article{gaur2024detect,
  title   = {No Detail Left Behind: Revisiting Self-Retrieval for Fine-Grained Image Captioning},
  author  = {Gaur, Manu and Singh S, Darshan and Tapaswi, Makarand},
  journal = {arXiv preprint arXiv:2409.03025},
  year    = {2024}
}
"""

_DESCRIPTION = """\
CIDEr-D (Vedantam et al., 2015) and BLEU-1..4 of image captions, identical to the COCO caption
evaluation code (pycocoevalcap) but without Java and much faster. Captions and references are
lower-cased and PTB-tokenised with punctuation removed, by a Python port of the Stanford PTB lexer
that pycocoevalcap runs (same output). CIDEr-D compares TF-IDF weighted n-grams (n = 1..4) of a
caption with those of its references, with clipped counts and a gaussian length penalty
(sigma = 6), times 10; document frequencies come from the references of the evaluated images, as in
pycocoevalcap, unless another reference corpus is given.
"""

_KWARGS_DESCRIPTION = """
Args:
    predictions (`list` of `str` or `None`): one caption per image; `None` = missing caption
        (scored as an empty caption: CIDEr-D 0, no words for BLEU).
    references (`list` of `list` of `str`): the reference captions of each image (at least one).
    tokenize (`bool`, default `True`): PTB-tokenise (pycocoevalcap's tokenizer, in Python) before
        scoring. Use `False` for captions that are already tokenised (words split on white space).
    per_caption (`bool`, default `False`): also return `cider_per_caption`.
    document_frequency_corpus (optional): where CIDEr-D's document frequencies come from: a list of
        reference lists (one per image; e.g. the training references used for an RL reward), or a
        `CiderD` scorer built once with `metrics.cider.CiderD(corpus)`. Default: `references`.
Returns:
    cider (`float`): corpus CIDEr-D (mean over captions; 1.0 = 100 in papers' tables).
    cider_per_caption (`list` of `float`): only with `per_caption=True`.
    bleu_1, bleu_2, bleu_3, bleu_4 (`float`): corpus BLEU-n (pycocoevalcap, closest reference length).
    num_missing (`int`) and missing (`list` of indices): the `None` predictions.
Examples:
    >>> import evaluate
    >>> cider = evaluate.load("metrics/cider_d")
    >>> results = cider.compute(
    ...     predictions=["A dog runs on the grass.", "A cat on a sofa."],
    ...     references=[["A dog running on the grass.", "A brown dog runs outside."],
    ...                 ["Two cats sleep on a red sofa.", "A cat lying on a couch."]],
    ...     per_caption=True)
    >>> round(results["cider"], 4), [round(s, 4) for s in results["cider_per_caption"]]
    (2.281, [2.892, 1.6699])
    >>> round(results["bleu_1"], 4), round(results["bleu_2"], 4)
    (0.9131, 0.7455)
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class CiderD(CaptionMetric):
    """CIDEr-D and BLEU-1..4 as pycocoevalcap computes them, without Java (module name ``cider_d``)."""

    def _info(self) -> evaluate.MetricInfo:
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Sequence(datasets.Value("string"))}
            ),
            codebase_urls=["https://github.com/tylin/coco-caption"],
            reference_urls=["https://arxiv.org/abs/1411.5726", "https://aclanthology.org/P02-1040/"],
        )

    def _compute(self, predictions, references, tokenize=True, per_caption=False, document_frequency_corpus=None):
        raw_predictions, missing_mask = split_missing(predictions)  # None = a missing caption: scored as ""
        raw_references = [list(r) for r in references]
        predictions, references = raw_predictions, raw_references
        if tokenize:  # once for both metrics, as pycocoevalcap: all references in order, then all predictions
            flat = ptb_tokenize([r for refs in raw_references for r in refs])
            ends = np.cumsum([len(r) for r in raw_references]).tolist()
            references = [flat[a:b] for a, b in zip([0] + ends[:-1], ends)]
            predictions = ptb_tokenize(raw_predictions)
        if document_frequency_corpus is None:  # pycocoevalcap: document frequencies from these references
            corpus, scores = cider_d(predictions, references, tokenize=False)
        else:
            scorer = document_frequency_corpus
            if not hasattr(scorer, "score"):
                scorer = CiderDScorer([list(r) for r in document_frequency_corpus], tokenize=tokenize)
            if getattr(scorer, "tokenize", False):  # the scorer tokenises its inputs itself
                corpus, scores = scorer.score(raw_predictions, raw_references)
            else:
                corpus, scores = scorer.score(predictions, references)
        bleus, _ = bleu(predictions, references, tokenize=False)
        out = {"cider": float(corpus)}
        if per_caption:
            out["cider_per_caption"] = [float(s) for s in scores]
        out.update({f"bleu_{k + 1}": float(b) for k, b in enumerate(bleus)})
        missing = [i for i, m in enumerate(missing_mask) if m]
        out.update(num_missing=len(missing), missing=missing)
        return out
