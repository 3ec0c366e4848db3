"""PanoLLaVA's caption metrics against the COCO caption evaluator (pycocoevalcap, test-only), and its
stage-1 VICReg loss against the seed's formula written pair by pair."""
from __future__ import annotations

import math

import pytest
import torch

from recipes.panollava.captions import bleu, caption_scores, cider, rouge_l, tokenize
from recipes.panollava.vicreg import overlap_pairs, vicreg_loss, vicreg_per_pair

CAPTIONS = [
    ("a red house left of a blue tree", ["a red house left of a blue tree", "a red house next to a tree"]),
    ("a blue tree", ["a red house left of a blue tree", "the blue tree stands alone"]),
    ("green car on the road near a house", ["a green car drives on the road", "a car near a house on a road",
                                            "green car parked by the house"]),
    ("sky is clear", ["the sky is clear and blue"]),
    ("two people walk a dog in the park", ["two people walking a dog in a park", "people with a dog in the park"]),
    ("yellow", ["a yellow wall", "yellow paint on a wall"]),
]


def test_bleu_rouge_cider_equal_pycocoevalcap():
    scorers = pytest.importorskip("pycocoevalcap")  # noqa: F841
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    preds = [p for p, _ in CAPTIONS]
    refs = [r for _, r in CAPTIONS]
    gts = {i: r for i, r in enumerate(refs)}
    res = {i: [p] for i, p in enumerate(preds)}
    want_bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    want_rouge, _ = Rouge().compute_score(gts, res)
    want_cider, _ = Cider().compute_score(gts, res)
    got = bleu(preds, refs)
    assert all(math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12) for g, w in zip(got, want_bleu)), (got, want_bleu)
    assert math.isclose(rouge_l(preds, refs), want_rouge, rel_tol=1e-9)
    assert math.isclose(cider(preds, refs), want_cider, rel_tol=1e-9)
    assert 0.1 < got[3] < got[0] < 1 and want_cider > 0.5      # the case is not degenerate
    # a brevity penalty case: every caption shorter than its closest reference
    short = ["a red house", "blue tree", "a car", "sky", "two people", "yellow"]
    want_short, _ = Bleu(4).compute_score(gts, {i: [p] for i, p in enumerate(short)}, verbose=0)
    assert all(math.isclose(g, w, rel_tol=1e-9, abs_tol=1e-12) for g, w in zip(bleu(short, refs), want_short))


def test_caption_scores_tokenize_and_check_their_input():
    assert tokenize("A Red house, left of a BLUE tree!") == "a red house left of a blue tree"
    perfect = caption_scores(["A red house."], [["a red house"]])
    assert perfect["bleu1"] == pytest.approx(1.0) and perfect["rouge_l"] == pytest.approx(1.0)
    assert set(perfect) == {"bleu1", "bleu2", "bleu3", "bleu4", "rouge_l", "cider"}
    with pytest.raises(ValueError, match="2 predictions for 1 reference sets"):
        caption_scores(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a"], [[]])


def _seed_pair_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """SEED_SYSTEMS.md section 5, one pair of [L, D] token sets, written out term by term."""
    L, D = x.shape
    inv = ((x - y) ** 2).mean()
    var = 0.5 * (torch.relu(1 - torch.sqrt(x.var(0, unbiased=False) + 1e-4)).mean()
                 + torch.relu(1 - torch.sqrt(y.var(0, unbiased=False) + 1e-4)).mean())
    cov = 0.0
    for z in (x, y):
        zc = z - z.mean(0)
        c = zc.T @ zc / (L - 1)
        cov = cov + 0.5 * (c.pow(2).sum() - c.diagonal().pow(2).sum()) / D
    return 25 * inv + 25 * var + cov


def test_vicreg_pairs_the_overlapping_strips_and_matches_the_seeds_formula():
    torch.manual_seed(0)
    b, v, side, d = 2, 4, 4, 6
    tokens = torch.randn(b * v, side * side, d)
    right, left = overlap_pairs(tokens, v, overlap=0.5)
    grid = tokens.view(b, v, side, side, d)
    assert right.shape == left.shape == (b * v, side * 2, d)
    # pair (panorama 1, view 3): view 3's two right columns against view 0's two left ones (the panorama closes)
    assert torch.equal(right[7], grid[1, 3, :, 2:].reshape(-1, d))
    assert torch.equal(left[7], grid[1, 0, :, :2].reshape(-1, d))
    got = vicreg_loss(tokens, v)
    want = torch.stack([_seed_pair_loss(right[i], left[i]) for i in range(b * v)]).mean()
    assert torch.allclose(got["loss"], want, rtol=1e-5)
    terms = vicreg_per_pair(right, left)
    assert set(got) == {"loss", "invariance", "variance", "covariance"}
    assert torch.allclose(got["invariance"], terms["invariance"].mean())
    # identical strips: no invariance term; spread-out, decorrelated features: no variance term
    same = vicreg_per_pair(right, right)
    assert same["invariance"].abs().max() == 0
    wide = vicreg_per_pair(right * 10, right * 10)
    assert wide["variance"].max() == 0
    with pytest.raises(ValueError, match="not B\\*3 views of a square patch grid"):
        overlap_pairs(tokens, 3)
