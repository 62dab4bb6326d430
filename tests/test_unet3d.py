"""`unet3d` (CLISC part 2's 3D U-Net on pseudo-labels): seeded patches, accumulation / bf16 steps, and learning
through the real trainer on Ray (medvl.methods.unet3d)."""
import numpy as np
import pytest
import torch
from stepcheck import assert_accumulation_matches_full_batch

from medvl.data.decode import decode_rows
from medvl.methods.unet3d import VolumePatchDecoder, mask_dice, predict_volume, random_patch, write_volume_corpus


def _volume(seed: int, shape=(40, 40, 32)):
    """Noisy tissue with a smooth bias and one or two bright ellipsoid 'lesions' (the label)."""
    rng = np.random.default_rng(seed)
    x, y, z = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
    label = np.zeros(shape, bool)
    for _ in range(int(rng.integers(1, 3))):
        c = [rng.uniform(8, s - 8) for s in shape]
        r = rng.uniform(3.5, 6.5, 3)
        label |= ((x - c[0]) / r[0]) ** 2 + ((y - c[1]) / r[1]) ** 2 + ((z - c[2]) / r[2]) ** 2 <= 1
    image = 0.3 * x / shape[0] + rng.normal(0, 0.25, shape) + 1.5 * label
    return image.astype(np.float32), label.astype(np.uint8)


def _corpus(tmp_path, n_train=16, n_val=2):
    cases = []
    for i in range(n_train + n_val):
        img, lab = _volume(i)
        cases.append((f"case{i:03d}", "train" if i < n_train else "val", img, lab, np.eye(4)))
    write_volume_corpus(tmp_path / "vols", cases)
    return str(tmp_path / "vols")


def _rows(corpus, split="train"):
    from medvl.data.corpus import iter_rows, shard_paths
    rows = list(iter_rows(shard_paths(corpus, split), columns=list(VolumePatchDecoder.columns)))
    return {k: np.array([r[k] for r in rows], dtype=object) for k in rows[0]}


def test_patches_are_seeded_padded_and_bad_cases_are_named(tmp_path):
    corpus = _corpus(tmp_path, n_train=3, n_val=0)
    batch = _rows(corpus)
    dec = VolumePatchDecoder([16, 16, 16], rot_flip=True, train=True)
    a = decode_rows(dec, batch, seed=1, epoch=0)
    b = decode_rows(dec, batch, seed=1, epoch=0)
    c = decode_rows(dec, batch, seed=1, epoch=1)
    assert a["image"].shape == (3, 1, 16, 16, 16) and a["image"].dtype == np.float16
    assert a["label"].shape == (3, 16, 16, 16) and a["label"].dtype == np.uint8
    assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
    assert not np.array_equal(a["image"], c["image"])  # another epoch, other crops
    # a crop is a piece of the volume (up to the turn / flip), label aligned with image
    img, lab = _volume(0)
    p_img, p_lab = random_patch(img, lab, (16, 16, 16), np.random.default_rng(3), rot_flip=False)
    hits = [(i, j, k) for i in range(25) for j in range(25) for k in range(17)
            if np.array_equal(img[i:i + 16, j:j + 16, k:k + 16], p_img)]
    assert len(hits) == 1 and np.array_equal(lab[tuple(slice(h, h + 16) for h in hits[0])], p_lab)
    # a volume smaller than the patch is zero-padded
    small_img, small_lab = random_patch(img[:10], lab[:10], (16, 16, 16), np.random.default_rng(0), True)
    assert small_img.shape == (16, 16, 16) and small_lab.shape == (16, 16, 16)
    # a case file without a label array: skipped, counted, named
    bad = tmp_path / "bad.npz"
    np.savez(bad, image=img)
    skipped = []
    out = decode_rows(dec, {"sample_id": np.array(["broken"], dtype=object), "image": np.array([None], dtype=object),
                            "image_uri": np.array([str(bad)], dtype=object)}, seed=0, epoch=0,
                      on_skip=skipped.extend)
    assert out is None and skipped and skipped[0][0] == "broken" and "lacks 'image' or 'label'" in skipped[0][1]


def test_accumulation_and_bf16_steps_equal_the_full_batch():
    data = {"method": "unet3d", "data": {"corpus": "x", "batch_size": 4}, "model": {"name": "test-vit-micro"},
            "optim": {"warmup_steps": 0, "grad_clip": None},
            "unet3d": {"channels": [4, 8], "patch": [16, 16, 16], "loss": "dice_ce"}}
    g = torch.Generator().manual_seed(0)
    batch = {"image": torch.randn(4, 1, 16, 16, 16, generator=g),
             "label": (torch.rand(4, 16, 16, 16, generator=g) > 0.7).to(torch.uint8)}
    terms = assert_accumulation_matches_full_batch(data, batch)
    assert set(terms) == {"loss", "ce", "dice"}


def test_config_errors_name_the_key():
    from medvl.config import ConfigError, load_recipe
    base = {"method": "unet3d", "data": {"corpus": "x"}, "model": {"name": "test-vit-micro"}}
    with pytest.raises(ConfigError, match="divisible by 8"):
        load_recipe(data={**base, "unet3d": {"channels": [8, 16, 32, 64], "patch": [48, 48, 44]}})
    with pytest.raises(ConfigError, match="unet3d.loss"):
        load_recipe(data={**base, "unet3d": {"loss": "focal"}})
    with pytest.raises(ConfigError, match="pos_fraction"):
        load_recipe(data={**base, "unet3d": {"pos_fraction": 1.5}})


@pytest.mark.slow
@pytest.mark.timeout(420)
def test_unet3d_learns_the_labels_through_ray_train(tmp_path, run_root, ray_local):
    """1 Ray Train worker, the real trainer: held-out label Dice far above an untrained network's."""
    from mlflow.tracking import MlflowClient

    from medvl.config import load_recipe
    from medvl.methods import resolve_method
    from medvl.train.launcher import load_model_from_checkpoint, run_training
    corpus = _corpus(tmp_path)
    recipe = load_recipe(data={
        "name": "unet3d-test", "method": "unet3d",
        "data": {"corpus": corpus, "batch_size": 2, "val_split": "val", "decode_tasks": 1},
        "model": {"name": "test-vit-micro"},
        "optim": {"lr": 3e-3, "warmup_steps": 5, "weight_decay": 0.0},
        "train": {"epochs": 5, "num_workers": 1, "cpus_per_worker": 2, "log_every": 4},
        "eval": {"every_epoch": True}, "track": {"log_model": False, "pictures": False},
        "unet3d": {"channels": [8, 16, 32], "patch": [32, 32, 32], "loss": "dice_ce"}})
    job, result = run_training(recipe)
    hist = MlflowClient(job.tracking_uri).get_metric_history(job.mlflow_run_id, "val/label_dice")
    dice = [m.value for m in sorted(hist, key=lambda m: m.step)]
    torch.manual_seed(0)
    untrained = resolve_method(recipe).build_model().net
    img, lab = _volume(16)  # the first validation case
    before = mask_dice(predict_volume(untrained, img, [32, 32, 32]), lab)
    print(f"[measured] unet3d on synthetic volumes: val label Dice per epoch {[round(d, 3) for d in dice]}, "
          f"untrained {before:.3f}")
    assert len(dice) == 5
    assert dice[-1] > 0.6 and dice[-1] > before + 0.4
    ckpt = result.checkpoint if hasattr(result, "checkpoint") else None
    if ckpt is not None:  # the saved model predicts like the evaluation said
        with ckpt.as_directory() as d:
            _, model, _ = load_model_from_checkpoint(recipe, d)
        assert mask_dice(predict_volume(model.net, img, [32, 32, 32]), lab) > 0.6


def test_hd95_in_mm_and_empty_predictions_are_failures():
    from medvl.eval.segmentation import hd95, hd95_summary
    truth = np.zeros((20, 20, 20), bool)
    truth[5:10, 5:10, 5:10] = True
    shifted = np.zeros_like(truth)
    shifted[7:12, 5:10, 5:10] = True  # 2 voxels along x
    assert hd95(truth, truth) == 0.0
    assert hd95(shifted, truth, spacing=(1.5, 1.0, 1.0)) == pytest.approx(3.0)  # 2 voxels x 1.5 mm
    assert np.isnan(hd95(np.zeros_like(truth), truth))  # empty prediction on a tumour case: never 0
    assert hd95(np.zeros_like(truth), np.zeros_like(truth)) == 0.0
    s = hd95_summary([2.0, 4.0, float("nan")], worst_mm=60.0)
    assert s == {"hd95_mean": 3.0, "hd95_std": 1.0, "hd95_failures": 1.0, "hd95_mean_failures_as_worst": 22.0}


def test_pos_fraction_one_centres_every_crop_on_the_label(tmp_path):
    """Foreground-biased crops: with pos_fraction 1 every training crop holds label, deterministically from the
    decoder's rng; uniform crops of the same small lesion often miss it; an empty label falls back to uniform."""
    rng = np.random.default_rng(0)
    cases = []
    for i in range(4):
        img = rng.normal(0, 1, (56, 56, 40)).astype(np.float32)
        lab = np.zeros(img.shape, np.uint8)
        c = rng.integers(4, 36, 3)
        lab[c[0]:c[0] + 3, c[1]:c[1] + 3, c[2]:c[2] + 3] = 1    # a 27-voxel lesion somewhere
        cases.append((f"case{i}", "train", img, lab, np.eye(4)))
    cases.append(("empty", "train", rng.normal(0, 1, (56, 56, 40)).astype(np.float32),
                  np.zeros((56, 56, 40), np.uint8), np.eye(4)))
    write_volume_corpus(tmp_path / "vols", cases)
    batch = _rows(str(tmp_path / "vols"))
    ids = list(batch["sample_id"])
    pos = VolumePatchDecoder([16, 16, 16], rot_flip=True, train=True, pos_fraction=1.0)
    uni = VolumePatchDecoder([16, 16, 16], rot_flip=True, train=True)
    missed = 0
    for epoch in range(10):
        a = decode_rows(pos, batch, seed=7, epoch=epoch)
        b = decode_rows(pos, batch, seed=7, epoch=epoch)
        assert np.array_equal(a["image"], b["image"]) and np.array_equal(a["label"], b["label"])
        for i, cid in enumerate(ids):
            if cid != "empty":
                assert a["label"][i].sum() > 0, f"epoch {epoch} case {cid}: a pos_fraction=1 crop without label"
            else:
                assert a["label"][i].sum() == 0 and a["image"][i].shape == (1, 16, 16, 16)
        u = decode_rows(uni, batch, seed=7, epoch=epoch)
        missed += sum(int(u["label"][i].sum() == 0) for i, cid in enumerate(ids) if cid != "empty")
    assert missed > 10  # of 40 uniform crops, most miss a 3^3 lesion in a 56x56x40 volume
    # pos_fraction 0 draws nothing extra: the old uniform crops, bit for bit
    img, lab = cases[0][2], cases[0][3]
    old = random_patch(img, lab, (16, 16, 16), np.random.default_rng(5), True)
    new = random_patch(img, lab, (16, 16, 16), np.random.default_rng(5), True, pos_fraction=0.0)
    assert all(np.array_equal(x, y) for x, y in zip(old, new))
    # the evaluation decoder never biases
    assert VolumePatchDecoder([16, 16, 16], rot_flip=True, train=False, pos_fraction=1.0).pos_fraction == 0.0


def test_init_starts_from_another_unet_and_bad_files_are_named(tmp_path):
    """`unet3d.init` (S3F's retraining from the filtered U-Net): the weights of a stage output / state file are
    loaded; a missing file, another architecture and a file needing arbitrary unpickling are ConfigErrors naming
    the path."""
    from medvl.config import ConfigError, load_recipe
    from medvl.methods import resolve_method

    def method(**unet):
        return resolve_method(load_recipe(data={
            "method": "unet3d", "data": {"corpus": "x"}, "model": {"name": "test-vit-micro"},
            "unet3d": {"channels": [4, 8], "patch": [16, 16, 16], **unet}}))
    torch.manual_seed(1)
    src = method().build_model()
    (tmp_path / "stage" / "model").mkdir(parents=True)
    torch.save({"model": src.state_dict(), "step": 7}, tmp_path / "stage" / "model" / "state.pt")
    torch.manual_seed(2)
    fresh = method().build_model()
    assert not all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), fresh.state_dict().values()))
    for init in (tmp_path / "stage", tmp_path / "stage" / "model" / "state.pt"):
        torch.manual_seed(2)
        got = method(init=str(init)).build_model()
        assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), got.state_dict().values()))
    with pytest.raises(ConfigError, match=r"unet3d.init: .*nowhere.*not found"):
        method(init=str(tmp_path / "nowhere")).build_model()
    with pytest.raises(ConfigError, match=r"unet3d.init: .*state.pt does not fit this unet3d"):
        resolve_method(load_recipe(data={
            "method": "unet3d", "data": {"corpus": "x"}, "model": {"name": "test-vit-micro"},
            "unet3d": {"channels": [4, 8, 16], "patch": [16, 16, 16], "init": str(tmp_path / "stage")}})).build_model()
    torch.save({"model": src.state_dict(), "bad": np.random.default_rng(0)}, tmp_path / "unsafe.pt")
    with pytest.raises(ConfigError, match=r"unet3d.init: .*unsafe.pt: refusing to load"):
        method(init=str(tmp_path / "unsafe.pt")).build_model()
