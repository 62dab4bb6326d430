"""Exported towers load in plain open_clip (a fresh interpreter, no medvl import) and embed exactly as in medvl."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from medvl.config import load_recipe
from medvl.methods import resolve_method
from medvl.models.export import CONFIG_FILE, WEIGHTS_FILE, write_open_clip_dir
from medvl.models.factory import model_arch

LOAD = textwrap.dedent("""
    import json, sys
    import numpy as np, torch, open_clip
    d, images, texts, out = sys.argv[1:5]
    model, _, preprocess = open_clip.create_model_and_transforms("local-dir:" + d)
    tok = open_clip.get_tokenizer("local-dir:" + d)
    model.eval()
    with torch.no_grad():
        img = model.encode_image(torch.from_numpy(np.load(images)), normalize=True)
        txt = model.encode_text(tok(json.load(open(texts))), normalize=True)
    np.savez(out, img=img.numpy(), txt=txt.numpy(), scale=float(model.logit_scale.exp()),
             size=np.asarray(preprocess.transforms[0].size))
    assert not [m for m in sys.modules if m == "medvl" or m.startswith("medvl.")], "medvl was imported"
""")


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_open_clip_export_loads_without_medvl_and_embeds_identically(tmp_path, loss):
    recipe = load_recipe(data={"data": {"corpus": str(tmp_path / "unused")}, "model": {"name": "test-vit-micro"},
                                 "loss": {"kind": loss}})
    method = resolve_method(recipe)
    clip = method.build_model().clip.eval()
    with torch.no_grad():  # move every weight off its init so a wrong or missing key changes the embeddings
        for p in clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = write_open_clip_dir(clip, dict(model_arch(recipe.model), **(
        {"init_logit_bias": float(clip.logit_bias)} if loss == "siglip" else {})), tmp_path / "oc")
    assert {p.name for p in out.iterdir()} == {CONFIG_FILE, WEIGHTS_FILE}

    size = model_arch(recipe.model)["vision_cfg"]["image_size"]
    images = torch.randn(3, 3, size, size)
    texts = ["a photo of the digit 3.", "a photo of the digit 7.", "an x-ray"]
    np.save(tmp_path / "images.npy", images.numpy())
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # nothing of medvl's on the path
    subprocess.run([sys.executable, "-c", LOAD, str(out), str(tmp_path / "images.npy"), str(tmp_path / "texts.json"),
                    str(tmp_path / "got.npz")], check=True, env=env, cwd=tmp_path, timeout=120)
    got = np.load(tmp_path / "got.npz")

    from medvl.models.factory import tokenizer
    with torch.no_grad():
        img = clip.encode_image(images, normalize=True)
        txt = clip.encode_text(tokenizer(recipe.model)(texts), normalize=True)
    np.testing.assert_allclose(got["img"], img.numpy(), atol=1e-5)
    np.testing.assert_allclose(got["txt"], txt.numpy(), atol=1e-5)
    assert got["scale"] == pytest.approx(float(clip.logit_scale.exp()), rel=1e-6)
    assert int(np.atleast_1d(got["size"])[0]) == size


# ------------------------------------------------------------------ the MLflow model of every contrastive method

_METHODS = {
    "clip": {},
    "cxr_clip": {"method": "cxr_clip"},
    "pmc_clip": {"method": "pmc_clip", "pmc_clip": {"fusion_layers": 1}},
    "clipin": {"clipin": {"enabled": True, "nc_width": 64}},
}


def _evaluated_towers(name: str, model):
    """The encoders each method's held-out evaluation calls (see its `evaluator`)."""
    if name == "pmc_clip":
        return model.encode_image, model.encode_text
    if name == "clipin":
        from medvl.methods.clipin import ClipinView
        v = ClipinView(model.inner, model.pre).clip
        return v.encode_image, v.encode_text
    return model.clip.encode_image, model.clip.encode_text


@pytest.mark.parametrize("name", list(_METHODS))
def test_every_contrastive_method_exports_a_pyfunc_that_embeds_as_its_evaluation(tmp_path, name):
    """recipe.json + model.safetensors (what `log_embedding_model` logs) rebuild the model, and the embedder gives
    the evaluation's own image/text embeddings; for one method also through mlflow.pyfunc's save/load."""
    import io

    import torch.nn.functional as F
    from PIL import Image

    from medvl.data.decode import normalize_images
    from medvl.methods.embedding import Embedder, write_model_files
    from medvl.models.factory import image_norm
    recipe = load_recipe(data={"data": {"corpus": str(tmp_path / "unused"), "batch_size": 8},
                               "model": {"name": "test-vit-micro"}, "train": {"num_workers": 1},
                               **_METHODS[name]})
    method = resolve_method(recipe)
    torch.manual_seed(0)
    model = method.build_model().eval()
    with torch.no_grad():  # off the init (and off the identity pre-projectors) so a wrong path changes the result
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    art = write_model_files(method, model, tmp_path / "files")
    emb = Embedder.from_files(art["recipe"], art["weights"])

    size = model_arch(recipe.model)["vision_cfg"]["image_size"]
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (size, size, 3), dtype=np.uint8) for _ in range(3)]
    pngs = []
    for a in arrays:
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        pngs.append(buf.getvalue())
    texts = ["a photo of the digit 3.", "an x-ray", "pleural effusion"]
    enc_img, enc_txt = _evaluated_towers(name, model)
    from medvl.models.factory import tokenizer
    with torch.no_grad():  # images of the model's size: the eval transform keeps them as they are
        x = normalize_images(torch.from_numpy(np.stack([a.transpose(2, 0, 1) for a in arrays])), *image_norm(recipe.model))
        want_img = F.normalize(enc_img(x), dim=-1).numpy()
        want_txt = F.normalize(enc_txt(tokenizer(recipe.model)(texts)), dim=-1).numpy()
    np.testing.assert_allclose(emb.embed_images(pngs), want_img, atol=1e-5)
    np.testing.assert_allclose(emb.embed_texts(texts), want_txt, atol=1e-5)

    if name == "clipin":  # the pyfunc itself, saved and loaded by mlflow (no tracking server needed)
        import mlflow.pyfunc
        import pandas as pd

        import medvl
        from medvl.methods.embedding_pyfunc import EMBED_REQUIREMENTS, MODEL_CODE, embedding_signature
        mlflow.pyfunc.save_model(str(tmp_path / "pyfunc"), python_model=MODEL_CODE, artifacts=art,
                                 code_paths=[os.path.dirname(medvl.__file__)],
                                 signature=embedding_signature(), pip_requirements=EMBED_REQUIREMENTS,
                                 input_example=pd.DataFrame({"image": pngs[:1], "text": texts[:1]}))
        got = mlflow.pyfunc.load_model(str(tmp_path / "pyfunc")).predict(
            pd.DataFrame({"image": pngs, "text": [texts[0], None, texts[2]]}))
        np.testing.assert_allclose(np.stack(got["image_embedding"]), want_img, atol=1e-5)
        assert got["text_embedding"][1] is None
        np.testing.assert_allclose(np.asarray(got["text_embedding"][2]), want_txt[2], atol=1e-5)
