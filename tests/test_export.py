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
