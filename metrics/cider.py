"""CIDEr-D without Java: vectorised, and numerically the same as pycocoevalcap's ``Cider``.

CIDEr-D (Vedantam, Zitnick and Parikh, "CIDEr: Consensus-based Image Description Evaluation",
CVPR 2015, https://arxiv.org/abs/1411.5726), exactly as ``pycocoevalcap/cider/cider_scorer.py``
computes it (that scorer *is* CIDEr-D: clipped n-gram counts and a length penalty):

* for n = 1..4, each caption is a TF-IDF vector of its n-grams, with
  ``idf = log(#documents) - log(max(1, df))``; a document is the reference set of one image and
  ``df`` counts the documents that contain the n-gram;
* candidate vs. one reference: ``sum_g min(c_g, r_g) * r_g / (|c| |r|)`` (the "-D" clipping; no
  division when a norm is 0) times ``exp(-(l_c - l_r)^2 / (2 sigma^2))``, sigma = 6;
* a caption's score is the mean over n of the sum over its references, divided by the number of
  references, times 10; the corpus score is the mean over captions.

Quirks of the reference implementation are kept on purpose: the "length" in the penalty is the
number of *bigrams* (``len(words) - 1``, 0 for a caption of fewer than 2 words), captions are split
on white space, and an n-gram absent from the document-frequency corpus gets ``df = 0``.

NDLB uses CIDEr-D in two ways: as a REINFORCE reward (Sec. 4.8 and Table 7, R = SR + lambda * CIDEr
with lambda = 0.5 chosen in App. C.4; document frequencies from the *training* references, computed
once: ``CiderD(train_refs)``, then ``score(samples, ids=image_ids)`` each step) and as an evaluation
metric (Sec. 4.2; the CIDEr columns of Tables 3-5 and 7; document frequencies from the evaluated
set's references, as pycocoevalcap does: :func:`cider_d`).

Implementation: words and n-grams get exact integer ids (an n-gram id is built from the id of its
(n-1)-gram prefix and its last word, so there are no hash collisions), and everything is computed
with numpy on all captions at once. :func:`cider_d` (document frequencies from the evaluated
references) sorts the n-gram occurrences of each order once, with the captions laid out image by
image, and reads document frequencies, TF-IDF weights, norms and clipped products off runs of that
sorted array (:func:`_grouped_cider_d`). :class:`CiderD` (a fixed document-frequency corpus, e.g.
for an RL reward) keeps an index of the corpus n-grams (:func:`index_ngrams`) and ``scipy.sparse``
TF-IDF rows. ``tests/test_cider.py`` checks every per-caption score of both against pycocoevalcap
to 1e-12.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain

import numpy as np
import scipy.sparse as sp

from .ptb_tokenizer import ptb_tokenize

__all__ = ["CiderD", "NgramIndex", "cider_d", "index_ngrams", "prepare_pairs", "split_words"]

Candidates = Sequence[str] | Mapping[Hashable, "str | Sequence[str]"]
References = Sequence[Sequence[str]] | Mapping[Hashable, Sequence[str]]
_PACK_LIMIT = 2**62  # a sort key and a position are packed in one int64 when key * span stays below this


# ----------------------------------------------------------------------------------------------
# inputs
# ----------------------------------------------------------------------------------------------
def _one_caption(key: Hashable, value: str | Sequence[str]) -> str:
    """A candidate given as a string or, pycocoevalcap style, as a one-element list."""
    if isinstance(value, str):
        return value
    if len(value) != 1 or not isinstance(value[0], str):
        raise ValueError(f"candidate {key!r}: expected a string or a list with exactly one string, got {value!r}")
    return value[0]


def prepare_pairs(
    candidates: Candidates, references: References | None
) -> tuple[list[Hashable] | None, list[str], list[list[str]] | None]:
    """Normalise candidates/references into (keys or None, candidate list, reference lists or None).

    Candidates are a list of strings or a mapping ``id -> caption`` (a string or pycocoevalcap's
    one-element list). References are a list of lists aligned with the candidates, or a mapping
    ``id -> list of captions`` that must contain every candidate id.
    """
    if isinstance(candidates, Mapping):
        keys: list[Hashable] | None = list(candidates)
        cands = [_one_caption(k, v) for k, v in candidates.items()]
    elif isinstance(candidates, str):
        raise TypeError("candidates must be a list of captions (or a mapping id -> caption), not one string")
    else:
        keys, cands = None, list(candidates)
        if not set(map(type, cands)) <= {str}:  # (a fast check first; str subclasses are fine too)
            for i, c in enumerate(cands):
                if not isinstance(c, str):
                    raise TypeError(f"candidate {i}: expected a string, got {type(c).__name__}")
    if references is None:
        return keys, cands, None
    if isinstance(references, Mapping):
        if keys is None:
            raise TypeError("references given as a mapping need candidates given as a mapping with the same ids")
        missing = [k for k in keys if k not in references]
        if missing:
            raise KeyError(f"no references for candidate ids {missing[:10]}" + (" ..." if len(missing) > 10 else ""))
        given = [references[k] for k in keys]
    else:
        given = list(references)
        if len(given) != len(cands):
            raise ValueError(f"{len(cands)} candidates but {len(given)} reference lists; they must be aligned")
    refs = [r if type(r) is list else list(r) for r in given]
    if str in set(map(type, given)) or not all(refs) or not set(map(type, chain.from_iterable(refs))) <= {str}:
        for i, (raw, r) in enumerate(zip(given, refs)):
            name = keys[i] if keys is not None else i
            if isinstance(raw, str) or not all(isinstance(x, str) for x in r):
                raise TypeError(f"references of candidate {name!r} must be a list of strings")
            if not r:
                raise ValueError(f"candidate {name!r} has no references")
    return keys, cands, refs


def split_words(captions: Sequence[str], tokenize: bool) -> list[list[str]]:
    """Words of each caption: PTB-tokenised first (:func:`ptb_tokenize`) when ``tokenize``; split on white space."""
    if tokenize:
        captions = ptb_tokenize(captions)
    return [c.split() for c in captions]


# ----------------------------------------------------------------------------------------------
# exact n-gram ids
# ----------------------------------------------------------------------------------------------
@dataclass
class NgramIndex:
    """All n-grams (orders 1..n) of a list of tokenised captions, with exact integer ids.

    Ids of order k are ``offsets[k-1] .. offsets[k]-1``. Unigram ids are word ids. The id of a
    k-gram (k >= 2) is its position in ``level_keys[k-1]``, the sorted keys
    ``(level id of its (k-1)-gram prefix) * n_words + (id of its last word)``.

    Attributes:
        tf_rows, tf_cols, tf_counts: the distinct (caption, n-gram id) pairs with their counts,
            order by order, each sorted by caption then id.
        order: (G,) order minus one of each n-gram id.
        prefix: (G,) id of the (k-1)-gram prefix (-1 for unigrams).
        last: (G,) word id of the last word.
        words: distinct words (word id -> word).
        lengths: (C,) number of words of each caption.
        level_keys: per order, the sorted keys described above.
        offsets: (n+1,) first id of each order.
    """

    tf_rows: list[np.ndarray]
    tf_cols: list[np.ndarray]
    tf_counts: list[np.ndarray]
    order: np.ndarray
    prefix: np.ndarray
    last: np.ndarray
    words: list[str]
    lengths: np.ndarray
    level_keys: list[np.ndarray]
    offsets: np.ndarray
    _word_ids: dict[str, int] | None = field(default=None, repr=False)

    @property
    def n(self) -> int:
        return len(self.offsets) - 1

    @property
    def n_ngrams(self) -> int:
        return int(self.offsets[-1])

    def counts(self) -> sp.csr_matrix:
        """(captions, n-grams) term-frequency matrix, float64 CSR in canonical form (built without sorting).

        A caption's row is its unigrams, then its bigrams, ... each already sorted by id, and ids
        grow with the order: the rows only need to be interleaved.
        """
        n_caps = len(self.lengths)
        per_order = [np.bincount(rows, minlength=n_caps) for rows in self.tf_rows]  # entries per (order, caption)
        indptr = np.concatenate([[0], np.cumsum(np.sum(per_order, axis=0))])
        indices = np.empty(int(indptr[-1]), np.int64)
        data = np.empty(int(indptr[-1]), np.float64)
        before = indptr[:-1].copy()  # where each caption's entries of the current order go
        for rows, cols, counts, sizes in zip(self.tf_rows, self.tf_cols, self.tf_counts, per_order):
            first_of_caption = np.cumsum(sizes) - sizes  # position of a caption's first entry in this order
            dest = (before - first_of_caption)[rows] + np.arange(len(rows))
            indices[dest], data[dest] = cols, counts
            before += sizes
        tf = sp.csr_matrix((data, indices, indptr), shape=(n_caps, self.n_ngrams))
        tf.has_sorted_indices = True
        return tf

    def locate(self, other: NgramIndex) -> np.ndarray:
        """Map every n-gram id of ``other`` to this index's id of the same n-gram (-1 if absent)."""
        if self._word_ids is None:
            self._word_ids = {w: i for i, w in enumerate(self.words)}
        n_words = len(self.words)
        word = np.fromiter((self._word_ids.get(w, -1) for w in other.words), np.int64, len(other.words))
        out = np.full(other.n_ngrams, -1, dtype=np.int64)
        out[: len(word)] = word
        for k in range(2, min(self.n, other.n) + 1):
            lo, hi = other.offsets[k - 1], other.offsets[k]
            prefix, last = out[other.prefix[lo:hi]], word[other.last[lo:hi]]
            known = (prefix >= 0) & (last >= 0)
            key = (prefix - self.offsets[k - 2]) * n_words + last
            keys = self.level_keys[k - 1]
            pos = np.searchsorted(keys, key)
            found = known & (pos < len(keys))
            found[found] = keys[pos[found]] == key[found]
            out[lo:hi] = np.where(found, pos + self.offsets[k - 1], -1)
        return out


def _factorize(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(values, return_inverse=True)`` for non-negative int64 keys, without its overheads."""
    n = len(values)
    if n and int(values.max()) < _PACK_LIMIT // n:  # sort (key, position) packed in one int64: faster than argsort
        packed = np.sort(values * n + np.arange(n))
        ordered = packed // n
        perm = packed - ordered * n
    else:
        perm = np.argsort(values)
        ordered = values[perm]
    first = np.empty(n, dtype=bool)
    first[:1] = True
    np.not_equal(ordered[1:], ordered[:-1], out=first[1:])
    inverse = np.empty(n, dtype=np.int64)
    inverse[perm] = np.cumsum(first) - 1
    return ordered[first], inverse


def _pair_counts(rows: np.ndarray, ids: np.ndarray, n_ids: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct (row, id) pairs, sorted by row then id, and how often each occurs (float64)."""
    packed = np.sort(rows * n_ids + ids)  # both in one int64, so a plain sort does it
    first = np.flatnonzero(np.concatenate([[True], packed[1:] != packed[:-1]])) if len(packed) else packed
    return packed[first] // n_ids, packed[first] % n_ids, np.diff(np.append(first, len(packed))).astype(np.float64)


def index_ngrams(word_lists: Sequence[Sequence[str]], n: int = 4) -> NgramIndex:
    """Give every distinct n-gram (orders 1..n) of the captions an exact integer id.

    Args:
        word_lists: the words of each caption.
        n: largest n-gram order.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    n_caps = len(word_lists)
    lengths = np.fromiter(map(len, word_lists), np.int64, n_caps)
    flat = list(chain.from_iterable(word_lists))
    distinct = list(dict.fromkeys(flat))
    word_ids = dict(zip(distinct, range(len(distinct))))
    n_words, n_tokens = len(word_ids), len(flat)
    tokens = np.fromiter(map(word_ids.__getitem__, flat), np.int64, n_tokens)
    caption = np.repeat(np.arange(n_caps), lengths)
    left = np.repeat(np.cumsum(lengths), lengths) - np.arange(n_tokens)  # words from here to the caption's end
    tf = [_pair_counts(caption, tokens, n_words)]  # per order: distinct (caption, id) pairs and counts
    order, prefix, last = [np.zeros(n_words, np.int64)], [np.full(n_words, -1, np.int64)], [np.arange(n_words)]
    level_keys, offsets = [np.arange(n_words)], [0, n_words]
    level_ids = tokens  # id within its order of the n-gram starting at each position
    for k in range(2, n + 1):
        starts = np.flatnonzero(left >= k)
        key = level_ids[starts] * n_words + tokens[starts + k - 1]  # (prefix, last word), exact in int64
        keys, inverse = _factorize(key)
        level_ids = np.zeros(n_tokens, np.int64)
        level_ids[starts] = inverse
        rows, ids, counts = _pair_counts(caption[starts], inverse, len(keys))
        tf.append((rows, ids + offsets[-1], counts))
        order.append(np.full(len(keys), k - 1, np.int64))
        prefix.append(keys // n_words + offsets[-2])
        last.append(keys % n_words)
        level_keys.append(keys)
        offsets.append(offsets[-1] + len(keys))
    return NgramIndex(
        tf_rows=[t[0] for t in tf], tf_cols=[t[1] for t in tf], tf_counts=[t[2] for t in tf],
        order=np.concatenate(order),
        prefix=np.concatenate(prefix), last=np.concatenate(last), words=list(word_ids), lengths=lengths,
        level_keys=level_keys, offsets=np.asarray(offsets, np.int64), _word_ids=word_ids,
    )


def _sum_by_order(matrix: sp.csr_matrix, order: np.ndarray, n: int, values: np.ndarray | None = None) -> np.ndarray:
    """(rows, n) sums of each row's entries (or of ``values``, aligned with them) per n-gram order."""
    n_rows = matrix.shape[0]
    row = np.repeat(np.arange(n_rows, dtype=np.int64), np.diff(matrix.indptr))
    weights = matrix.data if values is None else values
    return np.bincount(row * n + order[matrix.indices], weights=weights, minlength=n_rows * n).reshape(n_rows, n)


# ----------------------------------------------------------------------------------------------
# CIDEr-D
# ----------------------------------------------------------------------------------------------
@dataclass
class _Vectors:
    """TF-IDF rows with their per-order norms and penalty lengths (bigram counts)."""

    tfidf: sp.csr_matrix
    norms: np.ndarray
    lengths: np.ndarray


class CiderD:
    """CIDEr-D with document frequencies computed once from a reference corpus.

    Args:
        references: the document-frequency corpus: one list of reference captions per image, as a
            list or as a mapping ``image id -> captions``. For evaluation these are the evaluated
            images' references (what pycocoevalcap does); for an RL reward, the training references.
        n: largest n-gram order (4; pycocoevalcap's scorer only works with 4).
        sigma: standard deviation of the gaussian length penalty (6.0).
        tokenize: PTB-tokenise captions with :func:`~metrics.ptb_tokenizer.ptb_tokenize` (the Java-free
            pycocoevalcap tokenizer). ``False``: captions are already tokenised (split on white space).

    Example:
        >>> refs = {1: ["A dog runs on the grass.", "A brown dog running."], 2: ["Two cats sleep on a sofa."]}
        >>> scorer = CiderD(refs)
        >>> corpus, per_caption = scorer.score({1: "a dog running on grass", 2: "a cat on a sofa"})
        >>> [round(float(s), 4) for s in per_caption]
        [2.1651, 2.686]
        >>> round(scorer.score(["a dog running"], ids=[1])[0], 4)  # RL: the corpus references of image 1
        2.2487
    """

    def __init__(self, references: References, *, n: int = 4, sigma: float = 6.0, tokenize: bool = True) -> None:
        if isinstance(references, Mapping):
            self._keys: list[Hashable] = list(references)
            ref_lists = [list(v) for v in references.values()]
        else:
            ref_lists = [list(v) for v in references]
            self._keys = list(range(len(ref_lists)))
        for key, refs in zip(self._keys, ref_lists):
            if not refs or isinstance(refs, str) or not all(isinstance(r, str) for r in refs):
                raise ValueError(f"image {key!r}: references must be a non-empty list of strings")
        if not ref_lists:
            raise ValueError("the reference corpus is empty")
        self.n, self.sigma, self.tokenize = n, float(sigma), tokenize
        self._key_index = {k: i for i, k in enumerate(self._keys)}
        n_refs = np.fromiter(map(len, ref_lists), np.int64, len(ref_lists))
        self._ref_ptr = np.concatenate([[0], np.cumsum(n_refs)])  # refs of image i: rows ptr[i]:ptr[i+1]
        index = index_ngrams(split_words(list(chain.from_iterable(ref_lists)), tokenize), n)
        tf = index.counts()
        # document frequency: in how many images' reference sets each n-gram occurs
        # ((images x refs) membership @ (refs x n-grams) counts has one entry per (image, n-gram))
        membership = sp.csr_matrix((np.ones(len(tf.indptr) - 1), np.arange(len(tf.indptr) - 1), self._ref_ptr),
                                   shape=(len(ref_lists), tf.shape[0]))
        docs = membership @ tf
        self.document_frequency = np.bincount(docs.indices, minlength=index.n_ngrams).astype(np.float64)
        self.ref_len = np.log(float(len(ref_lists)))  # log(#documents), as pycocoevalcap's ref_len
        self._idf = self.ref_len - np.log(np.maximum(1.0, self.document_frequency))
        self._index = index
        self._refs = self._vectors(tf, self._idf, index)

    @property
    def num_documents(self) -> int:
        """Number of images (reference sets) in the document-frequency corpus."""
        return len(self._keys)

    def _vectors(self, tf: sp.csr_matrix, idf: np.ndarray, index: NgramIndex) -> _Vectors:
        data = tf.data * idf[tf.indices]  # tf * (ref_len - log(max(1, df)))
        tfidf = sp.csr_matrix((data, tf.indices, tf.indptr), shape=tf.shape)
        norms = np.sqrt(_sum_by_order(tfidf, index.order, self.n, data * data))
        tfidf.sort_indices()  # canonical rows: scipy's element-wise ops are twice as fast
        return _Vectors(tfidf, norms, np.maximum(index.lengths - 1, 0))

    def _idf_of(self, index: NgramIndex) -> tuple[np.ndarray, np.ndarray]:
        """(corpus id, idf) of every n-gram of ``index``; an n-gram unseen in the corpus has df = 0."""
        corpus_id = self._index.locate(index)
        idf = np.where(corpus_id >= 0, self._idf[np.maximum(corpus_id, 0)], self.ref_len - np.log(1.0))
        return corpus_id, idf

    def score(
        self, candidates: Candidates, references: References | None = None, *, ids: Sequence[Hashable] | None = None
    ) -> tuple[float, np.ndarray]:
        """CIDEr-D of candidate captions, with this corpus' document frequencies.

        Args:
            candidates: captions, as a list or as a mapping ``image id -> caption``.
            references: the candidates' references (aligned list of lists, or a mapping by id). When
                omitted, each candidate is compared with the corpus references of its image: the
                image is given by ``ids``, by the candidates' mapping keys, or by position.
            ids: corpus image ids of the candidates (repeats allowed, e.g. several samples per
                image); the fast path of an RL reward, since those references are already indexed.

        Returns:
            ``(corpus score, per-caption scores)``: the mean, and a float64 array in candidate order.
        """
        keys, cands, refs = prepare_pairs(candidates, references)
        if refs is not None:
            if ids is not None:
                raise ValueError("give either references or ids, not both")
            return self._score_with_references(cands, refs)
        if ids is None:
            ids = keys
        if ids is None:
            if len(cands) != self.num_documents:
                raise ValueError(
                    f"{len(cands)} candidates for {self.num_documents} corpus images: pass ids= or references="
                )
            images = np.arange(len(cands))
        else:
            if len(ids) != len(cands):
                raise ValueError(f"{len(cands)} candidates but {len(ids)} ids")
            try:
                images = np.fromiter((self._key_index[k] for k in ids), np.int64, len(ids))
            except KeyError as err:
                raise KeyError(f"image id {err.args[0]!r} is not in the reference corpus") from None
        index = index_ngrams(split_words(cands, self.tokenize), self.n)
        corpus_id, idf = self._idf_of(index)
        cand = self._vectors(index.counts(), idf, index)
        # n-grams absent from the corpus cannot match a corpus reference: drop them, keep the norms
        tfidf = cand.tfidf
        col = corpus_id[tfidf.indices]
        keep = col >= 0
        indptr = np.concatenate([[0], np.cumsum(keep)])[tfidf.indptr]
        cand.tfidf = sp.csr_matrix((tfidf.data[keep], col[keep], indptr), shape=(len(cands), self._index.n_ngrams))
        cand.tfidf.sort_indices()
        n_refs = np.diff(self._ref_ptr)[images]
        pair_cand = np.repeat(np.arange(len(cands)), n_refs)
        pair_ref = np.repeat(self._ref_ptr[images] - np.cumsum(n_refs) + n_refs, n_refs) + np.arange(n_refs.sum())
        return self._combine(cand, self._refs, pair_cand, pair_ref, n_refs, self._index.order)

    def _score_with_references(self, cands: list[str], refs: list[list[str]]) -> tuple[float, np.ndarray]:
        n_refs = np.fromiter(map(len, refs), np.int64, len(refs))
        words = split_words(cands, self.tokenize) + split_words(list(chain.from_iterable(refs)), self.tokenize)
        index = index_ngrams(words, self.n)
        vectors = self._vectors(index.counts(), self._idf_of(index)[1], index)
        pair_cand = np.repeat(np.arange(len(cands)), n_refs)
        pair_ref = len(cands) + np.arange(n_refs.sum())
        return self._combine(vectors, vectors, pair_cand, pair_ref, n_refs, index.order)

    def _combine(
        self, cand: _Vectors, ref: _Vectors, pair_cand: np.ndarray, pair_ref: np.ndarray, n_refs: np.ndarray,
        order: np.ndarray,
    ) -> tuple[float, np.ndarray]:
        """Clipped cosine of every (candidate, reference) pair, length penalty, averages."""
        hyp, rfs = cand.tfidf[pair_cand], ref.tfidf[pair_ref]  # (P, G) each
        clipped = hyp.minimum(rfs).multiply(rfs)  # min(c_g, r_g) * r_g on the shared n-grams
        val = _sum_by_order(sp.csr_matrix(clipped), order, self.n)  # (P, n)
        denominator = cand.norms[pair_cand] * ref.norms[pair_ref]
        nonzero = (cand.norms[pair_cand] != 0) & (ref.norms[pair_ref] != 0)
        val = np.where(nonzero, val / np.where(nonzero, denominator, 1.0), val)
        return _average(val, cand.lengths[pair_cand] - ref.lengths[pair_ref], pair_cand, n_refs, self.sigma)


# ----------------------------------------------------------------------------------------------
# CIDEr-D with document frequencies from the evaluated references (pycocoevalcap's setting)
# ----------------------------------------------------------------------------------------------
def _word_ids(captions: Sequence[str]) -> tuple[np.ndarray, np.ndarray, int]:
    """Exact ids of the white-space separated words of all captions.

    Returns (word id of every word, captions in order, int64), (words per caption) and the number
    of distinct words. The captions are split in one ``str.split`` of their concatenation, with a
    separator word that no caption contains (``"\\x00"``; otherwise each caption is split on its own).
    """
    n_caps = len(captions)
    if not n_caps:
        return np.zeros(0, np.int64), np.zeros(0, np.int64), 0
    joined = " \x00 ".join(captions)
    if joined.count("\x00") == n_caps - 1:
        words = joined.split()
        words.append("\x00")
        lengths = None
    else:
        per_caption = [c.split() for c in captions]
        words = list(chain.from_iterable(per_caption))
        lengths = np.fromiter(map(len, per_caption), np.int64, n_caps)
    distinct = dict.fromkeys(words)
    ids_of = dict(zip(distinct, range(len(distinct))))
    ids = np.fromiter(map(ids_of.__getitem__, words), np.int64, len(words))
    if lengths is not None:
        return ids, lengths, len(ids_of)
    separator = ids_of["\x00"]
    is_separator = ids == separator
    lengths = np.diff(np.flatnonzero(is_separator), prepend=-1) - 1
    ids = ids[~is_separator]
    ids -= ids > separator  # dense ids without the separator
    return ids, lengths, len(ids_of) - 1


def _grouped_cider_d(cands: list[str], refs: list[list[str]], n: int, sigma: float) -> tuple[float, np.ndarray]:
    """CIDEr-D of ``cands[i]`` against ``refs[i]``, document frequencies from all of ``refs``.

    Every quantity of CIDEr-D is computed order by order, so no global n-gram index is built. The
    captions are laid out image by image (candidate, then its references) and, for each order, the
    n-gram occurrences are sorted once by (n-gram, caption). In that order the occurrences of one
    n-gram in one image (a "document" plus its candidate) are adjacent, the candidate's first: the
    document frequencies, the TF-IDF weights, the norms and the clipped products
    ``min(c_g, r_g) * r_g`` all follow from runs of that one sorted array.
    """
    n_images = len(cands)
    n_refs = np.fromiter(map(len, refs), np.int64, n_images)
    layout: list[str] = []
    for cand, image_refs in zip(cands, refs):
        layout.append(cand)
        layout.extend(image_refs)
    sizes = n_refs + 1
    cand_row = np.cumsum(sizes) - sizes  # row of each image's candidate
    n_rows = len(layout)
    image = np.repeat(np.arange(n_images), sizes)
    is_cand = np.zeros(n_rows, bool)
    is_cand[cand_row] = True
    tokens, lengths, n_words = _word_ids(layout)
    n_tokens = len(tokens)
    caption = np.repeat(np.arange(n_rows), lengths)
    left = np.repeat(np.cumsum(lengths), lengths) - np.arange(n_tokens)  # words from here to the caption's end
    log_documents = np.log(float(n_images))  # pycocoevalcap's ref_len
    norms = np.zeros((n_rows, n))
    products = np.zeros((n_rows, n))  # sum over a reference's n-grams of min(c_g, r_g) * r_g
    level = tokens  # id (within its order) of the n-gram starting at each position
    for k in range(1, n + 1):
        starts = np.arange(n_tokens) if k == 1 else np.flatnonzero(left >= k)
        m = len(starts)
        if m == 0:
            break
        key = tokens if k == 1 else level[starts] * n_words + tokens[starts + (k - 1)]  # (prefix id, last word)
        # sort the occurrences by (n-gram, position), or by (n-gram, caption) for the last order
        tag, span = (starts, n_tokens) if k < n else (caption[starts], n_rows)
        if int(key.max()) < _PACK_LIMIT // span:  # both packed in one int64: a plain sort, faster than argsort
            packed = np.sort(key * span + tag)
            ordered = packed // span
            tag = packed - ordered * span
        else:
            perm = np.argsort(key, kind="stable")
            ordered, tag = key[perm], tag[perm]
        new_ngram = np.empty(m, bool)
        new_ngram[0] = True
        np.not_equal(ordered[1:], ordered[:-1], out=new_ngram[1:])
        if k < n:
            level = np.empty(n_tokens, np.int64)
            level[tag] = np.cumsum(new_ngram) - 1
            row = caption[tag]  # ascending within an n-gram, like the positions
        else:
            row = tag
        # distinct (n-gram, caption) entries with their counts
        entry = new_ngram.copy()
        np.logical_or(entry[1:], row[1:] != row[:-1], out=entry[1:])
        at = np.flatnonzero(entry)
        counts = np.diff(at, append=m).astype(np.float64)
        e_row, e_new_ngram = row[at], new_ngram[at]
        e_image = image[e_row]
        # documents: runs of entries of one n-gram and one image (its candidate's entry first, if any)
        doc_start = e_new_ngram.copy()
        np.logical_or(doc_start[1:], e_image[1:] != e_image[:-1], out=doc_start[1:])
        first = np.flatnonzero(doc_start)
        doc_size = np.diff(first, append=len(at))
        doc_has_cand = is_cand[e_row[first]]
        doc_has_ref = (doc_size > 1) | ~doc_has_cand
        doc_ngram = np.cumsum(e_new_ngram[first]) - 1
        n_ngrams = int(doc_ngram[-1]) + 1
        document_frequency = np.bincount(doc_ngram[doc_has_ref], minlength=n_ngrams)
        idf = log_documents - np.log(np.maximum(1.0, document_frequency))  # an n-gram only in candidates: df 0
        ngram_size = np.diff(np.flatnonzero(e_new_ngram), append=len(at))
        weight = counts * np.repeat(idf, ngram_size)  # tf * idf of each entry
        norms[:, k - 1] = np.bincount(e_row, weights=weight * weight, minlength=n_rows)
        # n-grams a reference shares with its candidate: the entries after a candidate's in a document
        shared = np.flatnonzero(doc_has_cand & (doc_size > 1))
        n_shared = doc_size[shared] - 1
        skip = first[shared] + 1 - (np.cumsum(n_shared) - n_shared)
        ref_entry = np.repeat(skip, n_shared) + np.arange(n_shared.sum())
        cand_weight, ref_weight = np.repeat(weight[first[shared]], n_shared), weight[ref_entry]
        products[:, k - 1] = np.bincount(e_row[ref_entry], weights=np.minimum(cand_weight, ref_weight) * ref_weight,
                                         minlength=n_rows)
    norms = np.sqrt(norms)
    ref_rows = np.flatnonzero(~is_cand)
    pair_image = image[ref_rows]
    cand_rows = cand_row[pair_image]
    cand_norm, ref_norm = norms[cand_rows], norms[ref_rows]
    val = products[ref_rows]
    nonzero = (cand_norm != 0) & (ref_norm != 0)
    val = np.where(nonzero, val / np.where(nonzero, cand_norm * ref_norm, 1.0), val)
    bigrams = np.maximum(lengths - 1, 0)  # pycocoevalcap's "length": the number of bigrams
    return _average(val, bigrams[cand_rows] - bigrams[ref_rows], pair_image, n_refs, sigma)


def _average(val: np.ndarray, delta: np.ndarray, pair_cand: np.ndarray, n_refs: np.ndarray,
             sigma: float) -> tuple[float, np.ndarray]:
    """Length penalty of each (candidate, reference) pair, then pycocoevalcap's averages.

    ``val``: (pairs, n) clipped cosines; ``delta``: length differences; ``pair_cand``: the
    candidate of each pair; ``n_refs``: references per candidate.
    """
    # gaussian length penalty, with pycocoevalcap's own expression for each distinct delta
    distinct, inverse = np.unique(delta, return_inverse=True)
    penalty = np.array([np.e ** (-(float(d) ** 2) / (2 * sigma**2)) for d in distinct.tolist()])
    val = val * penalty[inverse][:, None]
    # sum over each candidate's references (like `score += sim(...)`), mean over n
    n_cands, n = len(n_refs), val.shape[1]
    summed = np.stack([np.bincount(pair_cand, weights=val[:, k], minlength=n_cands) for k in range(n)], 1)
    scores = summed.mean(axis=1) / n_refs * 10.0
    return (float(np.mean(scores)) if n_cands else 0.0), scores


def cider_d(
    candidates: Candidates, references: References, *, n: int = 4, sigma: float = 6.0, tokenize: bool = True
) -> tuple[float, np.ndarray]:
    """CIDEr-D as pycocoevalcap computes it: document frequencies from these references.

    Args:
        candidates: one caption per image (list, or mapping ``image id -> caption``).
        references: the images' reference captions (aligned list of lists, or mapping by image id).
        n, sigma, tokenize: see :class:`CiderD`.

    Returns:
        ``(corpus score, per-caption scores in candidate order)``.

    Example:
        >>> corpus, per_caption = cider_d(["a dog running on grass", "a cat on a sofa"],
        ...                               [["A dog runs on the grass.", "A brown dog running."],
        ...                                ["Two cats sleep on a sofa."]])
        >>> round(corpus, 4)
        2.4256
    """
    _, cands, refs = prepare_pairs(candidates, references)
    if not refs:
        raise ValueError("the reference corpus is empty")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if tokenize:  # as pycocoevalcap: all references in one stream, then all candidates
        flat = ptb_tokenize(list(chain.from_iterable(refs)))
        ends = np.cumsum([len(r) for r in refs]).tolist()
        refs = [flat[a:b] for a, b in zip([0, *ends[:-1]], ends)]
        cands = ptb_tokenize(cands)
    return _grouped_cider_d(cands, refs, n, float(sigma))
