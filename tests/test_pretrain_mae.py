"""The embedded backbone's MAE pretraining script: patches, masks, the masked-only loss, the saved layout."""

from __future__ import annotations

import torch

from vptool.backbones import pretrain_digits_mae as mae
from vptool.backbones.build import build_backbone


def test_patchify_is_row_major_pixels_channel_last():
    x = torch.randn(2, 3, 24, 24)
    got = mae.patchify(x, 4)
    assert got.shape == (2, 36, 48)
    for r, c in [(0, 0), (0, 5), (3, 2), (5, 5)]:
        ref = x[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].permute(0, 2, 3, 1).reshape(2, -1)
        assert torch.equal(got[:, 6 * r + c], ref)


def test_masks_keep_a_quarter_and_loss_counts_masked_patches_only():
    torch.manual_seed(0)
    model = mae.MaskedAutoencoder(mae.build_encoder(), mask_ratio=0.75, norm_pix_loss=True).eval()
    keep, restore = model.random_mask(5, torch.Generator().manual_seed(3))
    assert keep.shape == (5, 9) and all(len(set(k.tolist())) == 9 for k in keep)
    x = torch.randn(5, 3, 24, 24)
    with torch.no_grad():
        loss = model(x, torch.Generator().manual_seed(3))
        pred = model.decode(model.encode_visible(x, keep), restore)
    # He et al. 2022: MSE against per-patch normalised pixels, averaged over the masked patches only
    t = mae.patchify(x, 4)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6).sqrt()
    err = ((pred - t) ** 2).mean(-1)
    masked = [[j for j in range(36) if j not in set(k.tolist())] for k in keep]
    want = torch.stack([err[b, masked[b]] for b in range(5)]).mean()
    assert torch.allclose(loss, want, rtol=1e-5)
    assert not torch.allclose(loss, err.mean(), rtol=1e-3)  # visible patches would change it


def test_saved_encoder_is_timm_layout_and_loads_strictly(tmp_path):
    cfg = mae.PretrainConfig(epochs=1, warmup_epochs=0, threads=1)
    threads = torch.get_num_threads()
    try:
        encoder, loss = mae.pretrain(cfg, log_every=1000)
    finally:  # pretrain sets torch's thread count; later in-process runs (bitwise references) need it back
        torch.set_num_threads(threads)
    out = tmp_path / "enc.safetensors"
    mae.save_encoder(encoder, out, cfg, loss, "test")
    from safetensors.torch import load_file

    sd = load_file(str(out))
    assert not any(k.startswith("decoder") or k == "mask_token" for k in sd)
    model, info = build_backbone("vit_digits_mae", checkpoint=str(out))  # strict: every key, every shape
    assert all(torch.equal(v, sd[k]) for k, v in model.state_dict().items())
