"""The normalisation trap (issue 17): MAE's encoder-only release ``mae_pretrain_vit_base.pth`` has timm's key
names, so under an untagged timm name with ``format: auto`` it loads as a timm file with that model's mean/std
(0.5/0.5 for ``vit_base_patch16_224``), while MAE was pretrained with ImageNet's. One warning line names the fix.
"""

from __future__ import annotations

import logging

import torch
from test_checkpoints import IMAGENET, NAME, TINY, randomize, vit_layout, write_mae_plain, write_timm_pth

from vptool.backbones.build import build_backbone, looks_like_mae_encoder


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_mae_encoder_file_under_an_untagged_name_warns_once(tmp_path, caplog):
    enc = randomize(vit_layout(), seed=4)
    path = write_mae_plain(enc, tmp_path / "mae_pretrain_vit_base.pth")
    with caplog.at_level(logging.WARNING):
        _, info = build_backbone(NAME, pretrained=False, checkpoint=str(path), kwargs=dict(TINY))
    lines = _warnings(caplog)
    assert info.format == "timm" and tuple(info.data_config["mean"]) == (0.5, 0.5, 0.5)
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "backbone.format: mae" in lines[0] and str(path) in lines[0] and f"{NAME}.mae" in lines[0]


def test_no_warning_with_format_mae_a_mae_tag_or_a_head(tmp_path, caplog):
    enc = randomize(vit_layout(), seed=4)
    mae = write_mae_plain(enc, tmp_path / "mae_pretrain_vit_base.pth")
    head = {**enc, "head.weight": torch.randn(7, TINY["embed_dim"]), "head.bias": torch.randn(7)}
    supervised = write_timm_pth(head, tmp_path / "supervised.pth")
    with caplog.at_level(logging.WARNING):
        _, info = build_backbone(NAME, pretrained=False, checkpoint=str(mae), kwargs=dict(TINY), format="mae")
        assert (tuple(info.data_config["mean"]), tuple(info.data_config["std"])) == IMAGENET
        build_backbone(f"{NAME}.mae", pretrained=False, checkpoint=str(mae), kwargs=dict(TINY))
        build_backbone(NAME, pretrained=False, checkpoint=str(supervised), kwargs=dict(TINY))
    assert _warnings(caplog) == []


def test_the_key_test_is_the_release_layout():
    enc = randomize(vit_layout(), seed=4)
    assert looks_like_mae_encoder(enc)
    assert not looks_like_mae_encoder({**enc, "head.weight": torch.zeros(1)})
    assert not looks_like_mae_encoder({**enc, "fc_norm.weight": torch.zeros(1)})
    assert not looks_like_mae_encoder({k: v for k, v in enc.items() if k != "norm.weight"})
