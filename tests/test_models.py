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
