"""The held-out evaluation of contrastive image-text models, assembled from the building blocks: retrieval
(R@k over unique captions, ties against the model), zero-shot classification with prompt ensembles, and an
optional linear probe on frozen image features. Every method built on image/text towers reuses it, giving it
its own encoders (and, if it likes, its own class prompts)."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from medvl.config import EvalConfig
from medvl.eval.heldout import HeldOut
from medvl.eval.pictures import picture_data
from medvl.eval.probe import linear_probe
from medvl.eval.retrieval import retrieval_metric_names, retrieval_metrics
from medvl.eval.zeroshot import ZERO_SHOT_METRICS, class_embeddings, encode_images, encode_texts, zero_shot_metrics


class ContrastiveEval:
    def __init__(self, heldout: HeldOut, cfg: EvalConfig, norm, tokenize: Callable,
                 probe_train: Optional[HeldOut] = None, prompts=None):
        self.val, self.cfg, self.norm, self.tokenize = heldout, cfg, norm, tokenize
        self.probe_train = probe_train
        self.prompts = prompts if prompts is not None else cfg.templates
        caps = heldout.captions
        self.unique = sorted(set(caps))
        index = {c: i for i, c in enumerate(self.unique)}
        self.caption_ids = torch.tensor([index[c] for c in caps])
        self.last_pictures: Optional[dict] = None

    @staticmethod
    def metric_names(cfg: EvalConfig, labelled: bool) -> set[str]:
        names = {"val/rows"} | retrieval_metric_names(cfg.retrieval_ks)
        if labelled:
            names |= set(ZERO_SHOT_METRICS)
            if cfg.linear_probe:
                names.add("val/linear_probe_accuracy")
        return names

    @torch.no_grad()
    def __call__(self, encode_image: Callable, encode_text: Callable, device) -> dict[str, float]:
        bs = self.cfg.batch_size
        img = encode_images(encode_image, self.val.images, self.norm, device, bs)
        txt = encode_texts(encode_text, self.tokenize, self.unique, device, bs)
        m = retrieval_metrics(img, txt, self.caption_ids, self.cfg.retrieval_ks)
        preds = None
        if self.val.labels is not None:
            cls = class_embeddings(encode_text, self.tokenize, self.val.classnames, self.prompts, device)
            zs, self.last_predictions = zero_shot_metrics(img, cls, self.val.labels, len(self.val.classnames))
            preds = self.last_predictions
            m.update(zs)
            if self.cfg.linear_probe and self.probe_train is not None and self.probe_train.labels is not None:
                tr = encode_images(encode_image, self.probe_train.images, self.norm, device, bs)
                p = linear_probe(tr.numpy(), self.probe_train.labels.numpy(), img.numpy(), self.val.labels.numpy(),
                                 label_fraction=self.cfg.probe_label_fraction)
                m["val/linear_probe_accuracy"] = p["accuracy"]
        # what the run's pictures show (medvl.eval.pictures): a few images' top captions, the zero-shot confusion
        self.last_pictures = picture_data(self.val.images, self.unique, self.caption_ids, img, txt,
                                          self.val.labels, preds, self.val.classnames)
        m["val/rows"] = float(len(self.val))
        return m
