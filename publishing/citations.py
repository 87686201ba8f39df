"""The BibTeX entries this project cites, defined once.

Model cards (`publishing.model_card`), dataset cards (`publishing.datasets`,
`datasets_scripts.truematch`) and the evaluate metric modules use these strings. The metric modules
may import only files of their own folder, so ``metrics/<name>/citations.py`` are symbolic links to
this file (through ``metrics/citations.py``), like ``image_loading.py``; this file imports nothing.
The NDLB entry is the authors' (README of ``manugaurdl/no-detail-left-behind``, arXiv:2409.03025).
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

__all__ = ["BLEU", "CIDER", "COCO", "NDLB"]
