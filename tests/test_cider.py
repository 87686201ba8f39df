"""metrics/cider.py and metrics/bleu.py against pycocoevalcap (the reference implementation).

CIDEr-D: every per-caption score within 1e-12 of pycocoevalcap's ``Cider`` on the same tokenised
input (random and real-looking captions, the RL path with document frequencies from a training
corpus). BLEU: bit-identical to ``Bleu(4)``.
"""

from __future__ import annotations

import random
from collections import Counter

import numpy as np
import pytest
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from metrics.bleu import bleu
from metrics.cider import CiderD, cider_d, index_ngrams
from metrics.ptb_tokenizer import ptb_tokenize

TOL = 1e-12

REAL = {  # COCO-style references and candidates (raw text: tokenised with ptb_tokenize below)
    101: (["A man riding a wave on top of a surfboard.", "A surfer rides a large wave in the ocean.",
           "A person on a surfboard riding a wave.", "Surfer in a black wetsuit catching a wave.",
           "A man surfing on a big blue wave."], "a man riding a wave on a surfboard"),
    102: (["A giraffe standing next to a tree in a field.", "A tall giraffe eating leaves from a tree.",
           "A giraffe in a grassy field near trees.", "One giraffe standing in the grass by a tree.",
           "A giraffe reaching up to eat from a tree."], "a giraffe standing in a field next to a tree"),
    103: (["Two dogs playing with a frisbee on the grass.", "A pair of dogs chase a red frisbee.",
           "Dogs running in a park with a frisbee.", "Two brown dogs playing in a park.",
           "Two dogs fight over a frisbee on a lawn."], "two dogs playing with a frisbee in a park"),
    104: (["A plate of food with broccoli and rice.", "A white plate topped with meat and vegetables.",
           "Broccoli, rice and chicken on a plate.", "A healthy meal of chicken, rice, and broccoli.",
           "A dinner plate with rice and green vegetables."], "a plate of food with rice and broccoli"),
    105: (["A kitchen with a stove, a sink and a fridge.", "A small kitchen with white cabinets.",
           "An empty kitchen with a refrigerator and an oven.", "A clean kitchen with wooden floors.",
           "The kitchen has a stove and a white refrigerator."], "a kitchen with a stove and a refrigerator"),
    106: (["A red double decker bus on a city street.", "A bus driving down a busy street.",
           "A double decker bus parked by the curb.", "A red bus in traffic in London.",
           "A tour bus on the road next to buildings."], "a red bus driving down a street"),
    107: (["A cat sleeping on a laptop keyboard.", "A gray cat lying on a computer.",
           "A kitten curled up on a laptop.", "A cat napping on top of an open laptop.",
           "A cat is laying on a keyboard."], "a cat laying on a laptop computer"),
    108: (["A woman holding an umbrella in the rain.", "A lady walks with an umbrella on a wet street.",
           "A person with a black umbrella.", "Woman under an umbrella walking in the rain.",
           "A woman carries an umbrella on a rainy day."], "a woman with an umbrella"),
    109: (["An elephant walking through a river.", "A large elephant crossing a river in the jungle.",
           "An elephant wading in water.", "A gray elephant walking in a stream.",
           "Elephant walking across a shallow river."], "an elephant"),
    110: (["A bathroom with a toilet and a sink.", "A white toilet next to a sink in a bathroom.",
           "A small bathroom with a shower.", "The bathroom has a toilet, sink and mirror.",
           "A clean white bathroom."], ""),
}


def _random_data(seed: int, n_images: int, vocab_size: int) -> tuple[dict, dict]:
    """Random word captions (pycocoevalcap's gts/res), with the awkward cases included."""
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(vocab_size)]
    cap = lambda lo=0, hi=14: " ".join(rng.choice(vocab) for _ in range(rng.randint(lo, hi)))  # noqa: E731
    gts = {i: [cap(1) for _ in range(rng.randint(1, 7))] for i in range(n_images)}
    res = {i: [cap()] for i in range(n_images)}
    res[0] = [""]  # empty candidate
    res[1] = ["unseen words only here"]  # words absent from every reference
    res[2] = [gts[2][0]]  # identical to a reference
    res[3] = [vocab[0]]  # a single word (length 0 for the penalty: bigram count)
    gts[4] = [gts[4][0]] * 3  # duplicated references
    res[5] = [f"{vocab[1]} {vocab[1]} {vocab[1]} {vocab[1]} {vocab[2]}"]  # repeated n-grams
    gts[6] = gts[6] + [""]  # an empty reference
    return gts, res


@pytest.mark.parametrize("seed,n_images,vocab_size", [(0, 200, 40), (1, 150, 8), (2, 300, 3000)])
def test_cider_matches_pycocoevalcap_on_random_data(seed, n_images, vocab_size):
    gts, res = _random_data(seed, n_images, vocab_size)
    theirs, their_scores = Cider().compute_score(gts, res)
    ours, our_scores = cider_d({k: v[0] for k, v in res.items()}, gts, tokenize=False)
    assert np.abs(our_scores - their_scores).max() <= TOL
    assert abs(ours - theirs) <= TOL
    assert our_scores[0] == 0.0 and our_scores[2] > our_scores[1] >= 0.0


def test_cider_and_bleu_match_pycocoevalcap_on_real_looking_captions():
    keys = list(REAL)
    refs = {k: ptb_tokenize(REAL[k][0]) for k in keys}
    cands = dict(zip(keys, ptb_tokenize([REAL[k][1] for k in keys])))
    theirs, their_scores = Cider().compute_score(refs, {k: [c] for k, c in cands.items()})
    ours, our_scores = cider_d(cands, refs, tokenize=False)
    assert np.abs(our_scores - their_scores).max() <= TOL and abs(ours - theirs) <= TOL
    assert 0.5 < ours < 3.0 and our_scores[-1] == 0.0  # sensible values; the empty caption scores 0
    # the same numbers from raw text: tokenize=True applies the same tokenizer
    raw_ours, raw_scores = cider_d({k: REAL[k][1] for k in keys}, {k: REAL[k][0] for k in keys})
    assert raw_ours == ours and np.array_equal(raw_scores, our_scores)
    their_bleu, their_per = Bleu(4).compute_score(refs, {k: [c] for k, c in cands.items()}, verbose=0)
    our_bleu, our_per = bleu(cands, refs, tokenize=False)
    assert our_bleu == their_bleu and our_per == their_per


@pytest.mark.parametrize("seed,vocab_size", [(3, 50), (4, 6), (5, 2000)])
def test_bleu_is_identical_to_pycocoevalcap(seed, vocab_size):
    gts, res = _random_data(seed, 200, vocab_size)
    their_bleu, their_per = Bleu(4).compute_score(gts, res, verbose=0)
    our_bleu, our_per = bleu({k: v[0] for k, v in res.items()}, gts, tokenize=False)
    assert our_bleu == their_bleu
    assert our_per == their_per


def _pycoco_with_corpus_df(corpus: list[list[str]], cands: list[str], cand_refs: list[list[str]]) -> np.ndarray:
    """pycocoevalcap's CiderScorer with document frequencies from ``corpus`` (the RL reward's setting)."""
    scorer = CiderScorer(n=4, sigma=6.0)
    for refs in corpus:
        scorer += (refs[0], refs)
    scorer.compute_doc_freq()
    pad = len(corpus) - len(cands)  # compute_cider takes ref_len = log(len(crefs)): keep the corpus size
    assert pad >= 0
    scorer.crefs = [cook_refs(r) for r in cand_refs] + scorer.crefs[:pad]
    scorer.ctest = [cook_test(c) for c in cands] + scorer.ctest[:pad]
    return np.array(scorer.compute_cider()[: len(cands)])


def test_precomputed_document_frequencies_for_rl_batches():
    gts, _ = _random_data(7, 300, 60)
    corpus = {f"img{k}": v for k, v in gts.items()}
    scorer = CiderD(corpus, tokenize=False)
    assert scorer.num_documents == 300 and scorer.ref_len == pytest.approx(np.log(300.0), abs=0)
    rng = random.Random(8)
    ids = [f"img{rng.randrange(300)}" for _ in range(40)] + ["img0", "img0"]  # repeated images (several samples)
    cands = [" ".join(f"w{rng.randrange(70)}" for _ in range(rng.randint(0, 12))) for _ in ids]
    expected = _pycoco_with_corpus_df(list(corpus.values()), cands, [corpus[i] for i in ids])
    _, fast = scorer.score(cands, ids=ids)  # references of the corpus images
    assert np.abs(fast - expected).max() <= TOL
    # the same with the references given at score time, and one caption at a time
    _, explicit = scorer.score(cands, [corpus[i] for i in ids])
    assert np.abs(explicit - expected).max() <= TOL
    assert abs(scorer.score(cands[5:6], ids=ids[5:6])[1][0] - fast[5]) <= TOL  # batch-independent
    # references outside the corpus: their n-grams have df = 0 but still match the candidate's
    new_refs = [["zz1 zz2 zz3 w1", "w1 w2 zz1 zz2"], ["zz4"]]
    new_cands = ["zz1 zz2 zz3 w1 w2", "zz4 w3"]
    expected = _pycoco_with_corpus_df(list(corpus.values()), new_cands, new_refs)
    assert np.abs(scorer.score(new_cands, new_refs)[1] - expected).max() <= TOL
    assert expected[0] > 0


def test_large_vocabulary_ids_are_exact():
    rng = random.Random(9)
    vocab = [f"v{i}" for i in range(120_000)]  # more than 2**16 words: no packing of 4 words into 64 bits
    gts = {i: [" ".join(rng.choice(vocab) for _ in range(12)) for _ in range(3)] for i in range(400)}
    res = {i: [" ".join(gts[i][0].split()[:9] + rng.sample(vocab, 2))] for i in range(400)}  # shares n-grams
    _, theirs = Cider().compute_score(gts, res)
    _, ours = cider_d({k: v[0] for k, v in res.items()}, gts, tokenize=False)
    assert np.abs(ours - theirs).max() <= TOL and theirs.mean() > 1.0


def test_cider_d_paths_agree_on_other_orders_and_awkward_words(monkeypatch):
    """cider_d's grouped computation vs the independent indexed one of CiderD, and vs pycocoevalcap."""
    import metrics.cider

    gts, res = _random_data(10, 120, 25)
    cands, refs = [res[k][0] for k in gts], list(gts.values())
    for n in (1, 2, 3, 5):  # pycocoevalcap only runs n = 4; the two implementations here take any n
        expected = CiderD(refs, n=n, tokenize=False).score(cands)[1]
        assert np.abs(cider_d(cands, refs, n=n, tokenize=False)[1] - expected).max() <= TOL, n
    # words that contain the separator cider_d uses to split all captions at once
    odd = {0: ["a\x00b c d", "c a\x00b"], 1: ["\x00 x y", "y"], 2: ["x y z"]}
    odd_res = {0: ["a\x00b c"], 1: ["x \x00"], 2: ["z y x"]}
    _, theirs = Cider().compute_score(odd, odd_res)
    _, ours = cider_d({k: v[0] for k, v in odd_res.items()}, odd, tokenize=False)
    assert np.abs(ours - theirs).max() <= TOL and theirs.max() > 0
    # the argsort path taken when (key, position) pairs do not fit one int64
    _, packed = cider_d(cands, refs, tokenize=False)
    monkeypatch.setattr(metrics.cider, "_PACK_LIMIT", 1)
    _, sorted_apart = cider_d(cands, refs, tokenize=False)
    assert np.abs(sorted_apart - packed).max() <= TOL and packed.max() > 0
    # no words at all (pycocoevalcap fails there): zeros
    assert cider_d(["", " "], [[""], ["", "  "]], tokenize=False)[1].tolist() == [0.0, 0.0]


def test_invalid_references_are_refused_before_scoring():
    with pytest.raises(TypeError, match="references of candidate 0 must be a list of strings"):
        cider_d(["a dog"], ["a dog"])  # a string instead of a list of strings
    with pytest.raises(TypeError, match="references of candidate 1 must be a list of strings"):
        cider_d(["a", "b"], [["a"], ["b", 3]])
    with pytest.raises(TypeError, match="candidate 1: expected a string"):
        cider_d(["a", None], [["a"], ["b"]])
    with pytest.raises(ValueError, match="the reference corpus is empty"):
        cider_d([], [])


def test_index_ngrams_counts_and_locate():
    words = [["a", "b", "a", "b", "a"], [], ["c"], ["b", "a", "b", "a", "c", "d"]]
    index = index_ngrams(words, 4)
    tf = index.counts().toarray()
    names = {}
    for gid in range(index.n_ngrams):  # rebuild each n-gram from its prefix chain
        names[gid] = (names[int(index.prefix[gid])] if index.prefix[gid] >= 0 else ()) + (index.words[index.last[gid]],)
        assert len(names[gid]) == index.order[gid] + 1
    for row, ws in enumerate(words):
        expected = Counter(tuple(ws[i:i + k]) for k in range(1, 5) for i in range(len(ws) - k + 1))
        assert {names[g]: tf[row, g] for g in np.flatnonzero(tf[row])} == expected
    other = index_ngrams([["b", "a", "b", "x"], ["a", "b", "a", "b", "a"]], 4)
    found = index.locate(other)
    other_names = {}
    for gid in range(other.n_ngrams):
        other_names[gid] = (other_names[int(other.prefix[gid])] if other.prefix[gid] >= 0 else ()) + (other.words[other.last[gid]],)
        assert (names[found[gid]] if found[gid] >= 0 else None) == (other_names[gid] if other_names[gid] in names.values() else None)
    assert sorted(other_names[g] for g in np.flatnonzero(found == -1)) == [("a", "b", "x"), ("b", "a", "b", "x"), ("b", "x"), ("x",)]


def test_input_forms_agree_and_bad_inputs_are_named():
    refs = {k: ptb_tokenize(REAL[k][0]) for k in list(REAL)[:4]}
    cands = {k: ptb_tokenize([REAL[k][1]])[0] for k in refs}
    by_key = cider_d(cands, refs, tokenize=False)
    by_position = cider_d(list(cands.values()), list(refs.values()), tokenize=False)
    pycoco_style = cider_d({k: [c] for k, c in cands.items()}, refs, tokenize=False)
    scorer = CiderD(refs, tokenize=False)
    assert by_key[0] == by_position[0] == pycoco_style[0] == scorer.score(cands)[0]
    assert np.array_equal(scorer.score(list(cands.values()))[1], by_key[1])  # corpus images by position
    with pytest.raises(KeyError, match="no references for candidate ids \\['x'\\]"):
        cider_d({"x": "a dog"}, refs)
    with pytest.raises(KeyError, match="not in the reference corpus"):
        scorer.score(["a dog"], ids=["nope"])
    with pytest.raises(ValueError, match="has no references"):
        cider_d(["a dog"], [[]])
    with pytest.raises(ValueError, match="aligned"):
        cider_d(["a dog", "a cat"], [["a dog"]])
    with pytest.raises(ValueError, match="pass ids= or references="):
        scorer.score(["a dog"])
    with pytest.raises(ValueError, match="exactly one string"):
        cider_d({1: ["a", "b"]}, {1: ["a"]})
    with pytest.raises(TypeError, match="not one string"):
        bleu("a dog", [["a dog"]])


def test_factorize_matches_numpy_unique_on_both_paths():
    from metrics.cider import _factorize

    rng = np.random.default_rng(0)
    for high in (50, 2**40, 2**61):  # the last forces the argsort path (no room to pack positions)
        values = rng.integers(0, high, 5000)
        keys, inverse = _factorize(values)
        expected_keys, expected_inverse = np.unique(values, return_inverse=True)
        assert np.array_equal(keys, expected_keys) and np.array_equal(inverse, expected_inverse)


def test_docstring_examples_run():
    import doctest

    import metrics.bleu
    import metrics.cider
    import metrics.ptb_tokenizer

    for module in (metrics.cider, metrics.bleu, metrics.ptb_tokenizer):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__
