"""CLISC part 2 building blocks: prompts from a CAM, the classical and SAM segmenters (medvl.models.segmenters)."""
import numpy as np
import pytest

from medvl.models.segmenters import NoPrompt, Prompts, build_segmenter, cam_box, cam_prompts, check_sam, \
    dilate_box, equalised_uint8


def _cam_case():
    """A 40 x 50 slice: CAM mask on rows 10..19, cols 20..29; CAM and intensity both peak in its lower-right part."""
    h, w = 40, 50
    cam_mask = np.zeros((h, w), bool)
    cam_mask[10:20, 20:30] = True
    cam = np.zeros((h, w))
    cam[10:20, 20:30] = 0.2
    cam[15:20, 25:30] = 1.0
    image = np.full((h, w), 10.0)
    image[15:20, 25:30] = 100.0
    return image, cam, cam_mask


def test_prompts_box_dilation_top_points_and_corner_negatives():
    image, cam, cam_mask = _cam_case()
    assert cam_box(cam_mask) == (20, 10, 30, 20)
    assert dilate_box((20, 10, 30, 20), 10, (40, 50)) == (10, 0, 40, 30)  # clipped at the top edge
    assert dilate_box((2, 3, 48, 39), 10, (40, 50)) == (0, 0, 50, 40)
    p = cam_prompts(image, cam, cam_mask, dilation=10, n_pos=5, n_neg=4)
    np.testing.assert_array_equal(p.box, [10, 0, 40, 30])
    pos, neg = p.positives, p.negatives
    assert len(pos) == 5 and len(neg) == 4
    # every positive point lies where CAM x intensity is highest (the 5 x 5 hot corner), spread over it
    assert all(25 <= x < 30 and 15 <= y < 20 for x, y in pos)
    assert len({(x, y) for x, y in pos}) == 5 and tuple(pos[0]) == (25, 15) and tuple(pos[-1]) == (29, 19)
    np.testing.assert_array_equal(neg, [[10, 0], [39, 0], [10, 29], [39, 29]])
    assert list(p.labels) == [1] * 5 + [0] * 4
    # fewer hot pixels than points asked for: each is used once
    cam2 = cam.copy()
    cam2[15:20, 25:30] = 0.2
    cam2[12, 22] = 1.0
    image2 = np.full((40, 50), 10.0)
    p2 = cam_prompts(image2, cam2, cam_mask, n_pos=5)
    assert [tuple(x) for x in p2.positives] == [(22, 12)]


def test_a_slice_without_cam_activation_has_no_prompt():
    image, cam, _ = _cam_case()
    with pytest.raises(NoPrompt, match="empty"):
        cam_prompts(image, cam, np.zeros_like(cam, bool))
    with pytest.raises(ValueError, match="differ in shape"):
        cam_prompts(image[:10], cam, cam > 0)


def _blob(seed=0):
    """A bright ellipse on a noisy, smoothly varying background, its mask, and a CAM-like box around it."""
    rng = np.random.default_rng(seed)
    h, w = 64, 64
    yy, xx = np.mgrid[:h, :w]
    truth = ((yy - 30) / 9.0) ** 2 + ((xx - 36) / 12.0) ** 2 <= 1
    image = 0.3 + 0.2 * xx / w + 0.5 * truth + rng.normal(0, 0.04, (h, w))
    cam = np.exp(-(((yy - 30) / 10.0) ** 2 + ((xx - 36) / 13.0) ** 2))
    return image, truth, cam, cam > 0.4


def _dice(a, b):
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_random_walker_segments_a_prompted_blob():
    image, truth, cam, cam_mask = _blob()
    p = cam_prompts(image, cam, cam_mask, dilation=6)
    mask = build_segmenter("random_walker")(image, p)
    assert mask.shape == image.shape and mask.dtype == bool
    assert _dice(mask, truth) > 0.85
    # nothing outside the dilated box
    x0, y0, x1, y1 = p.box.astype(int)
    outside = np.ones_like(mask)
    outside[y0:y1, x0:x1] = False
    assert not (mask & outside).any()


def test_tiny_random_init_sam_runs_through_the_same_segmenter_code():
    image, _, cam, cam_mask = _blob()
    seg = build_segmenter("sam", model_type="tiny")
    mask = seg(image[:48, :56], cam_prompts(image[:48, :56], cam[:48, :56], cam_mask[:48, :56]))
    assert mask.shape == (48, 56) and mask.dtype == bool  # back at the slice's own size (SAM's postprocess)
    p = Prompts(box=np.array([5, 5, 30, 30], np.float32))  # a box alone (the "SAM zero-shot" baseline's prompt)
    assert seg(image, p).shape == image.shape


def test_sam_checkpoint_and_type_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sam_vit_b.pth")):
        check_sam("vit_b", str(tmp_path / "sam_vit_b.pth"))
    with pytest.raises(ValueError, match="needs a checkpoint"):
        check_sam("vit_l", None)
    with pytest.raises(ValueError, match="vit_x"):
        build_segmenter("sam", model_type="vit_x", checkpoint="x")
    with pytest.raises(ValueError, match="segmenter 'watershed'"):
        build_segmenter("watershed")


def test_equalised_uint8_spreads_the_histogram():
    img = np.concatenate([np.full(100, 5.0), np.linspace(5.1, 6.0, 100)]).reshape(10, 20)
    eq = equalised_uint8(img)
    assert eq.dtype == np.uint8 and eq.max() == 255 and len(np.unique(eq)) > 50
    assert not equalised_uint8(np.ones((4, 4))).any()


def test_s3f_keep_by_rank_and_by_threshold():
    from medvl.eval.s3f import select, similarity
    scores = {"c1": 0.9, "c2": 0.1, "c3": 0.5, "c4": 0.5, "c5": 0.7, "c6": float("nan")}
    assert select(scores, "top", 0.5) == ["c1", "c3", "c5"]  # ceil(0.5 x 6) = 3; the 0.5 tie goes to c3 (id order)
    assert select(scores, "top", 0.6) == ["c1", "c3", "c4", "c5"]  # ceil(3.6) = 4
    assert select(scores, "top", 1.0) == ["c1", "c2", "c3", "c4", "c5"]  # the NaN case is never kept
    assert select(scores, "threshold", 0.5) == ["c1", "c3", "c4", "c5"]
    assert select(scores, "threshold", 0.95) == []
    with pytest.raises(ValueError, match="keep ratio"):
        select(scores, "top", 0.0)
    with pytest.raises(ValueError, match="mode 'best'"):
        select(scores, "best", 0.5)
    a = np.zeros((4, 4), bool)
    b = a.copy()
    assert similarity(a, b) == 1.0  # both empty: they agree
    b[0, 0] = True
    assert similarity(a, b) == 0.0
    a[0, :2] = True
    assert similarity(a, b) == pytest.approx(2 / 3)


def test_s3f_validity_against_known_truth():
    from medvl.eval.s3f import select, validity
    scores = {f"c{i}": s for i, s in enumerate([0.9, 0.8, 0.3, 0.2, 0.6])}
    truth = {f"c{i}": d for i, d in enumerate([0.85, 0.7, 0.4, 0.1, 0.5])}
    kept = select(scores, "top", 0.6)
    v = validity(scores, truth, kept)
    assert kept == ["c0", "c1", "c4"]
    assert v["s3f_spearman"] == pytest.approx(1.0)
    assert v["s3f_kept_true_dice"] == pytest.approx((0.85 + 0.7 + 0.5) / 3)
    assert v["s3f_dropped_true_dice"] == pytest.approx(0.25)


def test_s3f_component_choice_largest_most_probable_all():
    """A U-Net prediction with a large low-probability blob (a false positive) and a small confident one."""
    from medvl.eval.s3f import choose_component
    prob = np.zeros((20, 20, 20), np.float32)
    prob[1:9, 1:9, 1:9] = 0.6          # 512 voxels, mean 0.6 (summed 307: larger than the small blob's)
    prob[14:18, 14:18, 14:18] = 0.95   # 64 voxels, mean 0.95 (summed 61)
    mask = prob > 0.5
    big, small = np.zeros_like(mask), np.zeros_like(mask)
    big[1:9, 1:9, 1:9] = True
    small[14:18, 14:18, 14:18] = True
    np.testing.assert_array_equal(choose_component(mask, prob, "largest"), big)
    np.testing.assert_array_equal(choose_component(mask, prob, "most_probable"), small)
    np.testing.assert_array_equal(choose_component(mask, prob, "all"), mask)
    np.testing.assert_array_equal(choose_component(mask, None, "largest"), big)  # largest needs no probability
    empty = np.zeros_like(mask)
    assert not choose_component(empty, prob, "most_probable").any()
    with pytest.raises(ValueError, match="needs the foreground probability"):
        choose_component(mask, None, "most_probable")
    with pytest.raises(ValueError, match="expected one of"):
        choose_component(mask, prob, "biggest")


def test_s3f_component_is_validated_and_the_old_boolean_is_gone():
    from medvl.config import ConfigError
    from medvl.pipelines.kinds.clisc_seg import S3fConfig
    S3fConfig(component="most_probable").validate()
    with pytest.raises(ConfigError, match="component"):
        S3fConfig(component="biggest").validate()
    assert not hasattr(S3fConfig(), "largest_component")


def test_seg_eval_component_is_validated_and_the_table_names_it():
    from medvl.config import ConfigError
    from medvl.pipelines.kinds.clisc_seg import SegEvalConfig, format_table
    SegEvalConfig(cases="x", component="most_probable").validate()
    with pytest.raises(ConfigError, match="component"):
        SegEvalConfig(cases="x", component="biggest").validate()
    row = {"dice": 0.5, "dice_std": 0.1, "hd95": 10.0, "hd95_std": 1.0, "hd95_failures": 0,
           "hd95_worst_for_failures": 10.0}
    md = format_table({"unet": row}, "test", 2, 100.0, {}, "most_probable", {"unet": 0.25})
    assert "`most_probable` 3D component" in md and "unet 0.250" in md
    assert "component" not in format_table({"unet": row}, "test", 2, 100.0, {})  # `all`: the table as before
