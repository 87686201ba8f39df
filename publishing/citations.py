"""The BibTeX entries this project cites, defined once.

Model cards (:mod:`publishing.model_card`), dataset cards (:mod:`publishing.dataset_staging`,
``datasets_scripts.truematch``) and the README cite these strings. The evaluate metric modules
(``metrics/<name>/``) are loaded standalone by ``evaluate.load(path)`` and may import only files of
their own folder, so they carry a vendored copy in their ``_CITATION`` (and their README):
:data:`METRIC_CITATIONS` says which entries each one cites, :func:`bibtex` writes the text, and
``tests/test_citations.py`` checks that every copy equals it. The NDLB entry is the authors'
(README of ``manugaurdl/no-detail-left-behind``, arXiv:2409.03025).
"""

NDLB = """@article{gaur2024detect,
  title   = {No Detail Left Behind: Revisiting Self-Retrieval for Fine-Grained Image Captioning},
  author  = {Gaur, Manu and Singh S, Darshan and Tapaswi, Makarand},
  journal = {arXiv preprint arXiv:2409.03025},
  year    = {2024}
}"""

COCO = """@inproceedings{lin2014coco,
  title     = {Microsoft {COCO}: Common Objects in Context},
  author    = {Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and Hays, James and Perona, Pietro and
               Ramanan, Deva and Doll{\\'a}r, Piotr and Zitnick, C. Lawrence},
  booktitle = {European Conference on Computer Vision (ECCV)},
  year      = {2014}
}"""

CIDER = """@inproceedings{vedantam2015cider,
  title     = {CIDEr: Consensus-based Image Description Evaluation},
  author    = {Vedantam, Ramakrishna and Zitnick, C. Lawrence and Parikh, Devi},
  booktitle = {CVPR},
  year      = {2015}
}"""

BLEU = """@inproceedings{papineni2002bleu,
  title     = {BLEU: a Method for Automatic Evaluation of Machine Translation},
  author    = {Papineni, Kishore and Roukos, Salim and Ward, Todd and Zhu, Wei-Jing},
  booktitle = {ACL},
  year      = {2002}
}"""

# The entries each metric module's `_CITATION` holds, in order (vendored copies: see the module docstring).
METRIC_CITATIONS = {"cider_d": (CIDER, BLEU, NDLB), "truematch": (NDLB,)}


def bibtex(*entries: str) -> str:
    """The BibTeX text of `entries`, one per line block, ending with a newline (a `_CITATION` value)."""
    return "\n".join(entries) + "\n"


__all__ = ["BLEU", "CIDER", "COCO", "METRIC_CITATIONS", "NDLB", "bibtex"]
