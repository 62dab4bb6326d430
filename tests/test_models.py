import pytest
import torch

from medvl.config import ConfigError, ModelConfig
from medvl.models.factory import create_model, image_transforms


def test_local_weights_load_and_missing_file_is_clear(tmp_path):
    torch.manual_seed(3)
    src = create_model(ModelConfig(name="test-vit-micro"))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "w.pt")
    torch.manual_seed(4)
    m = create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "w.pt")))
    for k, v in src.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="not found"):
        create_model(ModelConfig(name="test-vit-micro", pretrained=str(tmp_path / "nope.pt")))


def test_unknown_model_and_local_config_dir(tmp_path):
    with pytest.raises(ConfigError, match="unknown model 'no-such-model'"):
        create_model(ModelConfig(name="no-such-model"))
    (tmp_path / "my-tiny.json").write_text(
        '{"embed_dim": 16, "vision_cfg": {"image_size": 16, "layers": 1, "width": 16, "head_width": 8, '
        '"patch_size": 8}, "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 2, '
        '"layers": 1}}')
    m = create_model(ModelConfig(name="my-tiny", config_dir=str(tmp_path)))
    out = m(torch.randn(2, 3, 16, 16), torch.randint(0, 100, (2, 8)))
    assert out["image_features"].shape == (2, 16)
    train_tf, _ = image_transforms(ModelConfig(name="my-tiny", config_dir=str(tmp_path)))
    from PIL import Image
    assert train_tf(Image.new("RGB", (40, 30))).shape == (3, 16, 16)


def test_lock_text_keeps_projection_trainable():
    m = create_model(ModelConfig(name="test-vit-micro", lock_text=True, lock_image=True))
    trainable = {n for n, p in m.named_parameters() if p.requires_grad}
    assert "logit_scale" in trainable and "visual.proj" in trainable
    assert not any(n.startswith(("transformer.", "token_embedding", "visual.transformer")) for n in trainable)


def test_seeded_random_resized_crop_is_torchvisions_algorithm():
    """The decoders' RandomResizedCrop draws its parameters from Python's `random` (seeded per sample) instead of
    torch tensors: same parameters as open_clip's transform, same fallback, same distribution of crops."""
    import random
    import statistics

    from PIL import Image
    from torchvision import transforms as T

    from medvl.models.factory import SeededRandomResizedCrop, _rrc_params, pil_transforms
    oc_train, _ = image_transforms(ModelConfig(name="digits-vit-tiny"))
    ours, _ = pil_transforms(ModelConfig(name="digits-vit-tiny"))
    ref = next(t for t in oc_train.transforms if type(t) is T.RandomResizedCrop)
    rrc = next(t for t in ours.transforms if isinstance(t, SeededRandomResizedCrop))
    assert (rrc.size, rrc.scale, rrc.ratio, rrc.interpolation, rrc.antialias) == \
        (ref.size, ref.scale, ref.ratio, ref.interpolation, ref.antialias)
    # the fallback (no crop of the sampled area fits a 1 x 1000 image): deterministic, must equal torchvision's
    assert _rrc_params(1, 1000, (0.9, 1.0), (0.75, 4 / 3), random.Random(0)) == \
        T.RandomResizedCrop.get_params(Image.new("L", (1000, 1)), [0.9, 1.0], [0.75, 4 / 3])
    # the distribution: crop area fraction and aspect ratio over many draws match torchvision's
    torch.manual_seed(0)
    rnd = random.Random(0)
    img = Image.new("L", (80, 60))
    a = [_rrc_params(60, 80, (0.08, 1.0), (0.75, 4 / 3), rnd) for _ in range(3000)]
    b = [T.RandomResizedCrop.get_params(img, [0.08, 1.0], [0.75, 4 / 3]) for _ in range(3000)]
    for f in (lambda p: p[2] * p[3] / 4800, lambda p: p[3] / p[2], lambda p: p[0], lambda p: p[1]):
        ma, mb = statistics.mean(map(f, a)), statistics.mean(map(f, b))
        assert abs(ma - mb) <= 0.05 * abs(mb) + 0.05, (ma, mb)
    # seeded per sample: the same seed gives the same crop
    x = Image.fromarray((torch.rand(40, 50) * 255).to(torch.uint8).numpy())
    random.seed(7)
    c1 = rrc(x)
    random.seed(7)
    assert list(rrc(x).getdata()) == list(c1.getdata())
