"""recipes.xca flow matching, sliding-window inference and vessel metrics, checked on cases with
closed-form answers (and against scikit-image / scipy where they are installed)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipes.xca.flow import FlowMatcher, ensemble_predict, flow_loss, sample
from recipes.xca.metrics import (
    VesselMetrics,
    betti1_erosion,
    betti_errors,
    cl_dice,
    connected_components,
    count_holes,
    skeletonize,
)
from recipes.xca.sliding import importance_map, sliding_window, window_starts


# ---------------------------------------------------------------- flow: solvers on exact cases
@pytest.mark.parametrize("method", ["euler", "heun"])
@pytest.mark.parametrize("steps", [1, 3, 7])
def test_constant_field_lands_exactly(method: str, steps: int) -> None:
    x0 = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    c = torch.randn(2, 1, 4, 4, dtype=torch.float64)
    x1 = sample(lambda x, t: c.expand_as(x), x0, steps, method)
    torch.testing.assert_close(x1, x0 + c)


def test_time_linear_field_heun_exact_euler_not() -> None:
    """v = a + b t integrates to a + b/2; Euler's left sums give a + b (N-1)/(2N)."""
    x0, a, b, n = torch.tensor([[0.3]], dtype=torch.float64), 0.5, 2.0, 4

    def v(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.shape == (x.shape[0],)
        return a + b * t.view(-1, 1).to(x.dtype) + 0 * x

    torch.testing.assert_close(sample(v, x0, n, "heun"), x0 + a + b / 2)
    torch.testing.assert_close(sample(v, x0, n, "euler"), x0 + a + b * (n - 1) / (2 * n))


def test_linear_decay_discrete_solutions() -> None:
    """v = -x: Euler multiplies by (1 - h) per step, Heun by (1 - h + h^2 / 2)."""
    x0, n = torch.tensor([[1.7, -0.4]], dtype=torch.float64), 5
    h = 1 / n
    torch.testing.assert_close(sample(lambda x, t: -x, x0, n, "euler"), x0 * (1 - h) ** n)
    torch.testing.assert_close(sample(lambda x, t: -x, x0, n, "heun"), x0 * (1 - h + h * h / 2) ** n)
    assert not torch.allclose(sample(lambda x, t: -x, x0, n, "euler"), x0 * math.exp(-1), atol=1e-3)


def test_euler_on_conditional_field_hits_target_at_any_step_count() -> None:
    """v = (x1 - x) / (1 - t) evaluated on t_k = k / N: the last Euler step lands on x1 exactly."""
    target = torch.tensor([[0.0, 1.0, 0.25]], dtype=torch.float64)
    x0 = torch.randn(1, 3, dtype=torch.float64)
    for n in (1, 2, 9):
        x1 = sample(lambda x, t: (target - x) / (1 - t.view(-1, 1)), x0, n, "euler")
        torch.testing.assert_close(x1, target)


def test_trajectory_keep() -> None:
    x0 = torch.zeros(1, 1)
    x1, states = sample(lambda x, t: torch.ones_like(x), x0, 8, "euler", keep=3)
    assert [float(s) for s in states] == [0.0, 0.5, 1.0] and states[-1] is x1
    with pytest.raises(ValueError):
        sample(lambda x, t: x, x0, 2, "rk4")


def test_dopri5_optional() -> None:
    pytest.importorskip("torchdiffeq")
    x0 = torch.tensor([[1.0]], dtype=torch.float64)
    torch.testing.assert_close(sample(lambda x, t: -x, x0, 4, "dopri5"), x0 * math.exp(-1), atol=1e-3, rtol=0)


def test_ensemble_mean_clamped_and_seeded() -> None:
    target = torch.tensor([-0.5, 0.3, 1.5]).view(1, 1, 1, 3)
    v = lambda x, t: (target - x) / (1 - t.view(-1, 1, 1, 1))  # noqa: E731
    p = ensemble_predict(v, (1, 1, 1, 3), 3, k=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(p, torch.tensor([0.0, 0.3, 1.0]).view(1, 1, 1, 3))
    noisy = lambda x, t: torch.zeros_like(x)  # noqa: E731 - output is the mean of the noise draws
    a = ensemble_predict(noisy, (2, 1, 4, 4), 2, k=3, generator=torch.Generator().manual_seed(1))
    b = ensemble_predict(noisy, (2, 1, 4, 4), 2, k=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)
    assert 0 < float(a.mean()) < 1


# ---------------------------------------------------------------- flow: path and loss
def test_path_endpoints_and_target() -> None:
    fm = FlowMatcher(0.25)
    x1 = (torch.rand(3, 1, 8, 8) > 0.5).float()
    x0 = torch.randn(3, 1, 8, 8)
    t, xt, ut = fm.sample_path(x1, x0=x0, t=torch.tensor([0.0, 1.0, 0.5]))
    torch.testing.assert_close(ut, x1 - x0)
    torch.testing.assert_close(xt[0], x0[0], atol=1e-4, rtol=0)  # sigma_t(0) = 0.25e-4
    torch.testing.assert_close(xt[1], x1[1], atol=1e-4, rtol=0)
    assert not torch.allclose(xt[2], 0.5 * (x0[2] + x1[2]), atol=1e-3)  # bridge noise mid-way
    g = torch.Generator().manual_seed(3)
    t, xt, ut = fm.sample_path(x1, generator=g)
    assert t.shape == (3,) and bool(((t >= 0) & (t < 1)).all()) and xt.shape == x1.shape


def test_bridge_noise_scale() -> None:
    """x0 = x1 = 0 at t = 0.5 leaves only the noise: std sigma * sqrt(0.25) = 0.125."""
    z = torch.zeros(1, 1, 128, 128)
    _, xt, _ = FlowMatcher(0.25).sample_path(z, torch.Generator().manual_seed(0), x0=z, t=torch.tensor([0.5]))
    assert abs(float(xt.std()) - 0.125) < 0.005


def test_loss_terms_and_bce_has_no_gradient() -> None:
    v = torch.tensor([[0.5, -1.0]], requires_grad=True)
    u = torch.tensor([[0.0, 1.0]])
    xt = torch.tensor([[0.5, 2.0]])
    x1 = torch.tensor([[1.0, 0.0]])
    out = flow_loss(v, u, xt, x1, torch.tensor([0.3]))
    torch.testing.assert_close(out["l1"], torch.tensor(1.25))
    p = torch.tensor(1 - 1e-7)  # x_t = 2 clamps to 1 - 1e-7 (float32)
    torch.testing.assert_close(out["bce"], -(math.log(0.5) + torch.log(1 - p)) / 2)
    torch.testing.assert_close(out["loss"], out["l1"] + 0.5 * out["bce"])
    out["loss"].backward()
    torch.testing.assert_close(v.grad, torch.tensor([[0.5, -0.5]]))  # L1's sign / n only


# ---------------------------------------------------------------- sliding window
def test_window_starts_like_monai() -> None:
    assert window_starts(512, 320, 0.25) == [0, 192]
    assert window_starts(320, 320, 0.25) == [0]
    assert window_starts(100, 40, 0.5) == [0, 20, 40, 60]
    assert window_starts(101, 40, 0.5) == [0, 20, 40, 60, 61]


def test_importance_map() -> None:
    w = importance_map((8, 6), "gaussian", 0.125)
    x = torch.arange(8.0) - 3.5
    column = torch.exp(-(x**2) / (2 * 1.0**2)) * math.exp(-(0.5**2) / (2 * 0.75**2))  # sigma = 0.125 * size
    torch.testing.assert_close(w[:, 2], column.clamp(min=1e-3))
    assert float(w.min()) == pytest.approx(1e-3)  # corners clamped
    assert torch.equal(importance_map((3, 3), "constant"), torch.ones(3, 3))


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
def test_sliding_equals_whole_image_for_pointwise_model(mode: str) -> None:
    image = torch.randn(2, 1, 37, 50)
    model = lambda x: torch.cat([torch.sigmoid(3 * x), x**2], 1)  # noqa: E731
    out = sliding_window(model, image, (16, 20), 0.25, mode, sw_batch_size=3)
    torch.testing.assert_close(out, model(image))


def test_sliding_window_positions_batches_and_blend() -> None:
    """Windows hold exactly the pixels MONAI's slices name; a per-window constant blends by weight."""
    h, w = 12, 9
    image = torch.arange(h * w, dtype=torch.float32).view(1, 1, h, w).repeat(2, 1, 1, 1)
    seen, sizes = [], []

    def window_mean(x: torch.Tensor) -> torch.Tensor:
        sizes.append(x.shape[0])
        seen.extend(int(c) for c in x[:, 0, 0, 0])
        return x.mean((2, 3), keepdim=True).expand_as(x)

    out = sliding_window(window_mean, image, (6, 6), 0.5, "constant", sw_batch_size=4)
    ys, xs = window_starts(h, 6, 0.5), window_starts(w, 6, 0.5)
    assert (ys, xs) == ([0, 3, 6], [0, 3])
    assert seen == [y * w + x for y in ys for x in xs] * 2 and sizes == [4, 4, 4]
    pix = image[0, 0]
    means = {(y, x): float(pix[y : y + 6, x : x + 6].mean()) for y in ys for x in xs}
    cover = [(y, x) for (y, x) in means if y <= 4 < y + 6 and x <= 2 < x + 6]  # pixel (4, 2)
    assert out[1, 0, 4, 2].item() == pytest.approx(sum(means[c] for c in cover) / len(cover))


def test_small_image_padded_symmetrically_with_zeros() -> None:
    image = torch.ones(1, 1, 5, 4)
    seen = []

    def record(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.clone())
        return x * 2

    out = sliding_window(record, image, (8, 8), mode="gaussian")
    expected = torch.zeros(8, 8)
    expected[1:6, 2:6] = 1  # pads (top, bottom) = (1, 2), (left, right) = (2, 2)
    assert len(seen) == 1 and torch.equal(seen[0][0, 0], expected)
    torch.testing.assert_close(out, image * 2)


# ---------------------------------------------------------------- topology on hand-drawn masks
def _line(h: int, w: int, rows: slice, cols: slice) -> np.ndarray:
    m = np.zeros((h, w), dtype=bool)
    m[rows, cols] = True
    return m


def test_cldice_hand_cases() -> None:
    two = _line(20, 30, slice(3, 6), slice(2, 28)) | _line(20, 30, slice(13, 16), slice(2, 28))
    assert cl_dice(two, two) == pytest.approx(1.0, abs=1e-5)
    one = _line(20, 30, slice(3, 6), slice(2, 28))
    assert cl_dice(one, two) == pytest.approx(2 / 3, abs=1e-4)  # tprec 1, tsens 1/2
    thick, thin = _line(20, 30, slice(6, 11), slice(2, 28)), _line(20, 30, slice(8, 9), slice(2, 28))
    # thin is its own skeleton and lies inside thick: tprec 1. By the paper's rules the 5-row bar loses,
    # per iteration, its bottom row + right column + top-left corner, then its top row + left column +
    # bottom-right corner; after two iterations only centre row 8, columns 4..24, is left (21 pixels, no
    # spur: skimage's table left a 2-pixel diagonal spur here, 21 of 23 on the row, 42/44). All 21 lie
    # on thin: tsens 1, clDice 1, while the pixel Dice is 2 * 26 / (26 + 130) = 1/3
    assert np.array_equal(skeletonize(thick), _line(20, 30, slice(8, 9), slice(4, 25)))
    assert cl_dice(thin, thick) == pytest.approx(1.0, abs=1e-4)
    assert cl_dice(np.zeros_like(two), two) == 0.0


def _disc(r_out: float, r_in: float = -1.0) -> np.ndarray:
    y, x = np.mgrid[:21, :21] - 10
    d = np.hypot(y, x)
    return (d <= r_out) & (d > r_in)


def test_betti_hand_cases() -> None:
    blobs = _line(12, 20, slice(2, 6), slice(2, 6)) | _line(12, 20, slice(2, 6), slice(12, 16))
    assert betti_errors(blobs, _line(12, 20, slice(2, 6), slice(2, 16))) == (1, 0)
    ring, disc = _disc(8, 4), _disc(8)
    assert betti_errors(ring, disc) == (0, 1)
    assert count_holes(_disc(8, 4) | _disc(3, 1)) == 2  # nested: ring, ring inside
    assert betti1_erosion(ring) == betti1_erosion(disc) == 0  # the original's approximation misses it
    dumbbell = blobs | _line(12, 20, slice(3, 4), slice(6, 12))  # erosion cuts the 1-pixel bridge
    assert betti1_erosion(dumbbell) == 1 and count_holes(dumbbell) == 0
    diagonal = np.eye(4, dtype=bool)
    assert connected_components(diagonal, 4)[1] == 4 and connected_components(diagonal, 8)[1] == 1


def _vessels(rng: np.random.Generator, size: int = 64) -> np.ndarray:
    """Random thick polylines and a blob or two, like a small angiogram mask."""
    y, x = np.mgrid[:size, :size]
    m = np.zeros((size, size), dtype=bool)
    for _ in range(int(rng.integers(2, 5))):
        pts = rng.uniform(0, size, (4, 2))
        radius = rng.uniform(0.6, 3.0)
        for a, b in zip(pts[:-1], pts[1:]):
            for s in np.linspace(0, 1, 40):
                c = a + s * (b - a)
                m |= (y - c[0]) ** 2 + (x - c[1]) ** 2 <= radius**2
    m |= rng.random((size, size)) < 0.01
    return m


def test_components_match_reference_libraries() -> None:
    measure = pytest.importorskip("skimage.measure")
    rng = np.random.default_rng(0)
    for _ in range(6):
        m = _vessels(rng)
        for conn, sk_conn in ((4, 1), (8, 2)):
            labels, n = connected_components(m, conn)
            assert np.array_equal(labels, measure.label(m, connectivity=sk_conn))
            assert count_holes(m, conn) == n - measure.euler_number(m, connectivity=sk_conn)


# ---------------------------------------------------------------- skeleton: textbook Zhang-Suen
def _is_thin_run(sk: np.ndarray) -> bool:
    """One 8-connected component and at most one pixel per column (a 1-pixel-thick curve)."""
    return connected_components(sk, 8)[1] == 1 and int(sk.sum(0).max()) == 1


def test_skeleton_thins_a_bar_to_a_line() -> None:
    bar = _line(9, 30, slice(3, 6), slice(2, 26))  # 3 rows, columns 2..25
    sk = skeletonize(bar)
    ys, xs = np.nonzero(sk)
    assert _is_thin_run(sk) and bool((sk <= bar).all())
    assert set(ys[(xs > xs.min()) & (xs < xs.max())].tolist()) == {4}  # the middle row between the ends
    # each end within 2 pixels of the bar's. By the paper's rules: sub-iteration 1 removes the bottom
    # row, the right column and the top-left corner; sub-iteration 2 the top row, the left column and
    # the pixel now at the right end of the middle row (E and S empty); then nothing is removable. So
    # the line is row 4, columns 3..23: one column lost on the left, two on the right
    assert xs.min() - 2 <= 2 and 25 - xs.max() <= 2
    assert (xs.min(), xs.max()) == (3, 23)


def test_skeleton_keeps_thin_shapes_and_topology() -> None:
    dot = _line(5, 5, slice(2, 3), slice(2, 3))
    assert np.array_equal(skeletonize(dot), dot)  # B = 0
    row, col = _line(7, 12, slice(3, 4), slice(1, 11)), _line(12, 7, slice(1, 11), slice(3, 4))
    diagonal = np.eye(9, dtype=bool)
    for thin in (row, col, diagonal):  # ends have B = 1, inner pixels A = 2
        assert np.array_equal(skeletonize(thin), thin)
    ell = _line(20, 20, slice(3, 16), slice(3, 7)) | _line(20, 20, slice(12, 16), slice(3, 17))
    sk = skeletonize(ell)
    assert connected_components(sk, 8)[1] == 1 and bool((sk <= ell).all())
    assert sk[:, 10:].any() and sk[:8].any()  # both arms still reached
    ring = _disc(8, 4)
    sk = skeletonize(ring)
    # the skeleton is an 8-connected closed curve (diagonal steps), so its hole is counted with
    # 8-connected foreground / 4-connected background; 4-connected it would leak through the steps
    assert connected_components(sk, 8)[1] == 1 and count_holes(sk, 8) == 1 and sk.sum() < ring.sum() / 2
    assert count_holes(skeletonize(_disc(8)), 8) == 0
    # known property of the paper's rules (not of skimage's table): a lone 2x2 block has B = 3 and
    # A = 1 everywhere and passes sub-iteration 1's products, so it vanishes in one step
    assert not skeletonize(np.ones((2, 2), dtype=bool)).any()


def _draw_polylines(lines: list[tuple[np.ndarray, int]], size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    img = Image.new("L", (size, size))  # mode "1" arrays hold bools stored as 255: skimage crashes
    draw = ImageDraw.Draw(img)
    for pts, width in lines:
        draw.line([(float(x), float(y)) for x, y in pts], fill=1, width=width, joint="curve")
    return np.asarray(img) > 0


def _vessel_pair(rng: np.random.Generator, size: int = 96) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt): gt = 3-5 random polylines 1-7 pixels wide; pred = the same vessels less the first,
    vertices moved up to 1.5 pixels and widths by +-1, plus one spurious vessel."""
    lines = [(rng.uniform(0, size, (int(rng.integers(3, 6)), 2)), int(rng.integers(1, 8)))
             for _ in range(int(rng.integers(3, 6)))]
    moved = [(pts + rng.uniform(-1.5, 1.5, pts.shape), max(1, w + int(rng.integers(-1, 2))))
             for pts, w in lines[1:]]
    moved.append((rng.uniform(0, size, (3, 2)), int(rng.integers(1, 5))))
    return _draw_polylines(moved, size), _draw_polylines(lines, size)


def _cl_dice_with(skel, pred: np.ndarray, gt: np.ndarray, smooth: float = 1e-5) -> float:
    """The original's clDice formula with a given skeleton function."""
    sp, sg = skel(pred), skel(gt)
    tprec = (sp & gt).sum() / (sp.sum() + smooth)
    tsens = (sg & pred).sum() / (sg.sum() + smooth)
    return float(2 * tprec * tsens / (tprec + tsens + smooth))


def test_cldice_close_to_skimage_skeleton() -> None:
    """The textbook skeleton against skimage's (the original metric's) on random vessel pairs.
    Measured on 200 such pairs: |clDice difference| mean 0.010, median 0.008, 95th percentile 0.026,
    max 0.049 (about 1 pair in 10 exceeds 0.02); the extra staircase corners of the paper's rules make
    ours 0.003 higher on average. Hence the bounds: mean over the pairs 0.02, each pair 0.05.
    8-connected component counts agreed on all 400 masks."""
    morphology = pytest.importorskip("skimage.morphology")
    pytest.importorskip("PIL")
    diffs = []
    for seed in range(8):
        pred, gt = _vessel_pair(np.random.default_rng(seed))
        ours = cl_dice(pred, gt)
        assert ours == pytest.approx(_cl_dice_with(skeletonize, pred, gt), abs=1e-12)
        diffs.append(abs(ours - _cl_dice_with(morphology.skeletonize, pred, gt)))
        for m in (pred, gt):
            ref = morphology.skeletonize(m)
            assert connected_components(skeletonize(m), 8)[1] == connected_components(ref, 8)[1]
    assert max(diffs) <= 0.05 and sum(diffs) / len(diffs) <= 0.02, diffs


def test_erosion_betti_matches_original_scipy_formula() -> None:
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(1)
    for _ in range(6):
        m = _vessels(rng, 48)
        ref = max(0, ndimage.label(ndimage.binary_erosion(m))[1] - ndimage.label(m)[1])
        assert betti1_erosion(m) == ref and connected_components(m)[1] == ndimage.label(m)[1]


# ---------------------------------------------------------------- the Metric
def test_vessel_metrics_against_hand_counts() -> None:
    gt = torch.zeros(2, 1, 4, 5)
    pred = torch.zeros(2, 1, 4, 5)
    gt[0, 0, 1, :] = 1  # image 0: a 5-pixel vessel row; prediction hits 3 of it and 1 background pixel
    pred[0, 0, 1, :3] = 0.9
    pred[0, 0, 3, 0] = 0.7
    gt[1, 0, :, 2] = 1  # image 1: a 4-pixel column, predicted exactly (as probabilities)
    pred[1, 0, :, 2] = 0.6
    m = VesselMetrics()
    m.update(pred, {"label": gt})
    r = m.compute()
    tp, fp, fn, tn = 3 + 4, 1, 2, (20 - 6) + 16  # pooled over both images
    assert r["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert r["iou"] == pytest.approx(tp / (tp + fp + fn))
    assert r["precision"] == pytest.approx(tp / (tp + fp)) and r["recall"] == pytest.approx(tp / (tp + fn))
    assert r["specificity"] == pytest.approx(tn / (tn + fp))
    # torchmetrics' 2-class macro per image (class scores averaged), then the mean over the 2 images
    a_tp, a_fp, a_fn, a_tn = 3, 1, 2, 14
    prec0 = (a_tp / (a_tp + a_fp) + a_tn / (a_tn + a_fn)) / 2
    rec0 = (a_tp / (a_tp + a_fn) + a_tn / (a_tn + a_fp)) / 2
    iou0 = (a_tp / (a_tp + a_fp + a_fn) + a_tn / (a_tn + a_fp + a_fn)) / 2
    dice0 = (2 * a_tp / (2 * a_tp + a_fp + a_fn) + 2 * a_tn / (2 * a_tn + a_fp + a_fn)) / 2
    assert r["precision_macro"] == pytest.approx((prec0 + 1) / 2)
    assert r["recall_macro"] == pytest.approx((rec0 + 1) / 2) == pytest.approx(r["specificity_macro"])
    assert r["iou_macro"] == pytest.approx((iou0 + 1) / 2)
    assert r["dice_macro"] == pytest.approx((dice0 + 1) / 2)
    # the original's row-wise "dice": image 0 rows 1 (6/8) and 3 (0/1); image 1 four rows of 1
    assert r["dice_orig"] == pytest.approx(((6 / 8 + 0) / 2 + 1) / 2)
    assert r["betti0_error"] == pytest.approx(0.5)  # image 0: 2 components vs 1
    assert r["betti1_error"] == 0 and r["betti1_error_orig"] == 0
    per_image = [cl_dice(p[0].numpy() > 0.5, y[0].numpy() > 0.5) for p, y in zip(pred, gt)]
    assert r["cldice"] == pytest.approx(sum(per_image) / 2) and per_image[1] == pytest.approx(1, abs=1e-5)
    m.reset()
    assert math.isnan(m.compute()["cldice"])


def test_vessel_metrics_match_torchmetrics_when_installed() -> None:
    """Where torchmetrics exists, the *_macro values and dice_orig equal what the original logged."""
    tm = pytest.importorskip("torchmetrics")
    from torchmetrics.segmentation import DiceScore

    g = torch.Generator().manual_seed(0)
    preds = (torch.rand(3, 1, 16, 16, generator=g) > 0.6).long()
    labels = (torch.rand(3, 1, 16, 16, generator=g) > 0.7).long()
    m = VesselMetrics()
    m.update(preds.float(), {"label": labels.float()})
    r = m.compute()
    pairs = {
        "precision_macro": tm.classification.MulticlassPrecision(2, average="macro"),
        "recall_macro": tm.classification.MulticlassRecall(2, average="macro"),
        "specificity_macro": tm.classification.MulticlassSpecificity(2, average="macro"),
        "iou_macro": tm.classification.MulticlassJaccardIndex(2, average="macro"),
        "dice_macro": DiceScore(num_classes=2, average="macro", input_format="index"),
        "dice_orig": DiceScore(num_classes=2, average="macro"),  # the original's call, as it was made
    }
    for key, metric in pairs.items():
        per_image = [float(metric(p, y)) for p, y in zip(preds, labels)]  # batch size 1, as logged
        assert r[key] == pytest.approx(sum(per_image) / 3, abs=1e-6), key
