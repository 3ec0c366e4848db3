"""Caption metrics as the COCO caption evaluator (pycocoevalcap) computes them: BLEU-1..4, ROUGE-L, CIDEr.

The seed scores its captions with pycocoevalcap; these are the same definitions in plain Python
(tests/test_panollava_captions.py checks them against pycocoevalcap's scorers on the same
tokens). Text is lower-cased and split into words with punctuation removed (`tokenize`), in place
of the Java PTB tokenizer the COCO toolkit calls.

- BLEU-n: corpus-level; clipped n-gram precisions summed over all captions, geometric mean of
  1..n, brevity penalty against the reference length closest to each caption's.
- ROUGE-L: per caption, LCS-based F-measure (beta 1.2) from the best precision and the best recall
  over its references; mean over captions.
- CIDEr (CIDEr-D as the toolkit implements it): tf-idf n-gram vectors (1..4, document frequency
  over the evaluated references), clipped cosine per reference with a length penalty
  (sigma 6), mean over references and n, times 10; mean over captions. Its length term counts
  bigrams, as the toolkit's does.
"""
from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from typing import Sequence

_WORD = re.compile(r"[a-z0-9]+(?:'[a-z]+)?")


def tokenize(text: str) -> str:
    """Lower case, words only (punctuation dropped), single spaces."""
    return " ".join(_WORD.findall(text.lower()))


def _ngrams(words: list[str], n: int) -> Counter:
    return Counter(tuple(words[i: i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def bleu(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4) -> list[float]:
    """Corpus BLEU-1..n of tokenized captions against their references."""
    tiny, small = 1e-15, 1e-9
    guess, correct = [0.0] * n, [0.0] * n
    test_len = ref_len = 0.0
    for pred, refs in zip(predictions, references):
        words = pred.split()
        ref_words = [r.split() for r in refs]
        max_counts: dict[tuple, int] = {}
        for r in ref_words:
            for g, c in _ngrams(r, n).items():
                max_counts[g] = max(max_counts.get(g, 0), c)
        counts = _ngrams(words, n)
        for k in range(n):
            guess[k] += max(len(words) - k, 0)
        for g, c in counts.items():
            correct[len(g) - 1] += min(c, max_counts.get(g, 0))
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in ref_words)[1]   # the closest length
    scores, product = [], 1.0
    ratio = (test_len + tiny) / (ref_len + small)
    for k in range(n):
        product *= (correct[k] + tiny) / (guess[k] + small)
        score = product ** (1.0 / (k + 1))
        scores.append(score * math.exp(1 - 1 / ratio) if ratio < 1 else score)
    return scores


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(predictions: Sequence[str], references: Sequence[Sequence[str]], beta: float = 1.2) -> float:
    """Mean over captions of the LCS F-measure with the best precision and recall over references."""
    total = 0.0
    for pred, refs in zip(predictions, references):
        words = pred.split()
        precision = recall = 0.0
        for r in refs:
            rw = r.split()
            lcs = _lcs(words, rw)
            precision = max(precision, lcs / len(words) if words else 0.0)
            recall = max(recall, lcs / len(rw) if rw else 0.0)
        if precision and recall:
            total += (1 + beta ** 2) * precision * recall / (recall + beta ** 2 * precision)
    return total / max(len(predictions), 1)


def cider(predictions: Sequence[str], references: Sequence[Sequence[str]], n: int = 4, sigma: float = 6.0) -> float:
    """CIDEr-D of the COCO toolkit; document frequencies over these references."""
    ref_counts = [[_ngrams(r.split(), n) for r in refs] for refs in references]
    df: Counter = Counter()
    for counts in ref_counts:
        df.update(set(g for c in counts for g in c))
    log_docs = math.log(float(len(references))) if references else 0.0

    def vec(counts: Counter) -> tuple[list[dict], list[float], int]:
        v: list[dict] = [defaultdict(float) for _ in range(n)]
        norm, length = [0.0] * n, 0
        for g, tf in counts.items():
            k = len(g) - 1
            v[k][g] = float(tf) * (log_docs - math.log(max(1.0, df[g])))
            norm[k] += v[k][g] ** 2
            if k == 1:
                length += tf
        return v, [math.sqrt(x) for x in norm], length

    total = 0.0
    for pred, counts in zip(predictions, ref_counts):
        hv, hn, hl = vec(_ngrams(pred.split(), n))
        score = [0.0] * n
        for c in counts:
            rv, rn, rl = vec(c)
            for k in range(n):
                val = sum(min(x, rv[k][g]) * rv[k][g] for g, x in hv[k].items())
                if hn[k] and rn[k]:
                    val /= hn[k] * rn[k]
                score[k] += val * math.exp(-((hl - rl) ** 2) / (2 * sigma ** 2))
        total += sum(score) / n / len(counts) * 10.0
    return total / max(len(predictions), 1)


def caption_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Raw captions and their reference captions -> {bleu1..bleu4, rouge_l, cider} (tokenized here)."""
    if len(predictions) != len(references):
        raise ValueError(f"caption_scores: {len(predictions)} predictions for {len(references)} reference sets")
    if any(not refs for refs in references):
        raise ValueError("caption_scores: every caption needs at least one reference")
    preds = [tokenize(p) for p in predictions]
    refs = [[tokenize(r) for r in rs] for rs in references]
    out = {f"bleu{k + 1}": s for k, s in enumerate(bleu(preds, refs))}
    out["rouge_l"] = rouge_l(preds, refs)
    out["cider"] = cider(preds, refs)
    return out
