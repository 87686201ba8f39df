"""BLEU-1..4 as pycocoevalcap's ``Bleu(4)`` computes it, vectorised.

BLEU (Papineni et al., ACL 2002) in the variant of the COCO caption evaluation code
(``pycocoevalcap/bleu/bleu_scorer.py``): clipped n-gram counts against each image's references,
the *closest* reference length for the brevity penalty (ties go to the shorter reference), and
the same smoothing constants (1e-15 added to matches, 1e-9 to guesses). NDLB reports BLEU-4 with
CIDEr (Sec. 4.2, Table 3).

Counting is vectorised with the exact n-gram ids of :func:`metrics.cider.index_ngrams`; the final
formulas run in plain Python floats in the reference's order, so scores are bit-identical to
pycocoevalcap's (``tests/test_cider.py``).
"""

from __future__ import annotations

import math
from itertools import chain

import numpy as np

from .cider import Candidates, References, index_ngrams, prepare_pairs, split_words

__all__ = ["bleu"]

_TINY, _SMALL = 1e-15, 1e-9  # pycocoevalcap's smoothing constants


def bleu(
    candidates: Candidates, references: References, n: int = 4, *, tokenize: bool = True
) -> tuple[list[float], list[list[float]]]:
    """Corpus and per-caption BLEU-1..n, as ``pycocoevalcap.bleu.bleu.Bleu(n).compute_score``.

    Args:
        candidates: one caption per image (list, or mapping ``image id -> caption``).
        references: the images' reference captions (aligned list of lists, or mapping by image id).
        n: largest n-gram order.
        tokenize: PTB-tokenise first (the Java-free pycocoevalcap tokenizer); ``False`` for
            already tokenised captions.

    Returns:
        ``(corpus BLEU-1..n, per-caption scores)``: a list of n floats and n lists (one value per
        candidate, in candidate order), like pycocoevalcap.

    Example:
        >>> scores, _ = bleu(["a dog runs on the grass"], [["A dog runs on the grass.", "A dog running."]])
        >>> [round(s, 4) for s in scores]
        [1.0, 1.0, 1.0, 1.0]
    """
    _, cands, refs = prepare_pairs(candidates, references)
    n_refs = np.fromiter(map(len, refs), np.int64, len(refs))
    n_cands = len(cands)
    index = index_ngrams(split_words(cands, tokenize) + split_words(list(chain.from_iterable(refs)), tokenize), n)
    counts = index.counts()
    hyp, ref = counts[:n_cands].tocoo(), counts[n_cands:].tocoo()
    # largest count of each n-gram over a candidate's references: sort (candidate, n-gram) keys
    n_ngrams = index.n_ngrams
    key = np.repeat(np.arange(n_cands), n_refs)[ref.row] * n_ngrams + ref.col
    order = np.argsort(key)
    key, value = key[order], ref.data[order]
    first = np.flatnonzero(np.concatenate([[True], key[1:] != key[:-1]])) if len(key) else np.zeros(0, np.int64)
    keys, max_ref = key[first], np.maximum.reduceat(value, first) if len(key) else np.zeros(0)
    query = hyp.row.astype(np.int64) * n_ngrams + hyp.col
    pos = np.minimum(np.searchsorted(keys, query), max(len(keys) - 1, 0))
    found = (keys[pos] == query) if len(keys) else np.zeros(len(query), bool)
    clipped = np.where(found, np.minimum(hyp.data, max_ref[pos] if len(keys) else 0.0), 0.0)
    correct = np.bincount(hyp.row.astype(np.int64) * n + index.order[hyp.col], weights=clipped,
                          minlength=n_cands * n).reshape(n_cands, n).astype(np.int64)
    test_len = index.lengths[:n_cands]
    # closest reference length: smallest |l - test length|, then the smaller l
    ref_len = index.lengths[n_cands:]
    pair = np.repeat(np.arange(n_cands), n_refs)
    span = int(ref_len.max(initial=0)) + 1
    closest = np.full(n_cands, np.iinfo(np.int64).max)
    np.minimum.at(closest, pair, np.abs(ref_len - test_len[pair]) * span + ref_len)
    closest %= span

    per_caption: list[list[float]] = [[] for _ in range(n)]
    total_correct, total_guess = [0] * n, [0] * n
    for c in range(n_cands):  # pycocoevalcap's formulas, in its order, in Python floats
        t, r = int(test_len[c]), int(closest[c])
        score = 1.0
        for k in range(n):
            guess = max(0, t - k)
            total_correct[k] += int(correct[c, k])
            total_guess[k] += guess
            score *= (float(correct[c, k]) + _TINY) / (float(guess) + _SMALL)
            per_caption[k].append(score ** (1.0 / (k + 1)))
        ratio = (t + _TINY) / (r + _SMALL)
        if ratio < 1:
            for k in range(n):
                per_caption[k][-1] *= math.exp(1 - 1 / ratio)
    corpus, score = [], 1.0
    for k in range(n):
        score *= float(total_correct[k] + _TINY) / (total_guess[k] + _SMALL)
        corpus.append(score ** (1.0 / (k + 1)))
    ratio = (int(test_len.sum()) + _TINY) / (int(closest.sum()) + _SMALL)
    if ratio < 1:
        corpus = [s * math.exp(1 - 1 / ratio) for s in corpus]
    return corpus, per_caption
