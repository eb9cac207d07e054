"""Prompt locations (VPT Fig. 5, §4.3; ``prompt.location``), each against a forward written here from the paper's
description and the official code's (``vit_ablations.py``, ``MODEL.PROMPT.LOCATION``), with timm's own patch
embedding and blocks; every location also has a control that puts the same prompts somewhere else and must
differ. Then: gradients reach the location's tensors only, adapters round-trip, refusals are one line, and the
``prompt.location`` recipe key trains through the CLI."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from beit_layout import NAME as BEIT_NAME
from beit_layout import TINY as BEIT_TINY
from conftest import TINY_KWARGS, TINY_NAME, assert_one_line_naming, invoke_cli, tiny_recipe, write_recipe
from safetensors.torch import load_file
from scipy import ndimage

from vptool.backbones.build import build_backbone
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT

L, K = 3, 5  # blocks of the tiny ViT, classes
IMAGENET = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1))


@pytest.fixture(scope="module")
def vit():
    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs={**TINY_KWARGS, "depth": L})
    with torch.no_grad():
        bb.pos_embed.normal_(std=0.5)  # a position embedding of real magnitude (timm starts it near zero)
    return bb


@pytest.fixture(scope="module")
def beit():
    torch.manual_seed(0)
    bb, _ = build_backbone(BEIT_NAME, pretrained=False, kwargs=dict(BEIT_TINY))
    with torch.no_grad():
        for blk in bb.blocks:  # layer scale of real magnitude (timm starts it at 1e-5): the blocks see the prompts
            blk.gamma_1.fill_(1.0)
            blk.gamma_2.fill_(1.0)
    return bb


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def model_for(bb, location, mode="shallow", form="paper", Np=3, **kw):
    """The model, its prompt tensors and head drawn at real magnitude (deterministic), in eval mode."""
    m = PromptedViT(bb, K, mode, Np, prompt_location=location, prompt_location_form=form, **kw).eval()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in [*m.prompts.parameters(), *m.get_classifier().parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return m


def logits(m, t):
    """The model's head on the CLS row after the backbone's final norm (readout cls/pretrained)."""
    return m.get_classifier()(m.family.final_norm(m.backbone)(t[:, 0]))


def run_blocks(bb, t, before=None):
    """timm's blocks on t (B, T, D); ``before(i, t)`` changes the rows entering block i."""
    for i, blk in enumerate(bb.blocks):
        if before is not None:
            t = before(i, t)
        t = blk(t) if not hasattr(blk, "gamma_1") else blk(t, shared_rel_pos_bias=None)
    return t


def embedded(bb, patches):
    """CLS, then the (B, N, D) patch embeddings, plus the absolute position embedding (if any)."""
    t = torch.cat([bb.cls_token.expand(patches.shape[0], -1, -1), patches], dim=1)
    return t if bb.pos_embed is None else t + bb.pos_embed


def conv_tokens(bb, x, w, b):
    """Patch embeddings of images x with a patch projection of weight w and bias b: (B, N, D)."""
    P = bb.patch_embed.patch_size[0]
    return F.conv2d(x, w, b, stride=P).flatten(2).transpose(1, 2)


# --------------------------------------------------------------------------------------------------- add / add-1
def add_reference(bb, x, sets, blocks, on_cls):
    """Fig. 5 "Add": set j is added element-wise to the patch embeddings entering block ``blocks[j]``; the official
    code adds (1 + N, D) sets to the class token too. A (1, D) set (add-1) broadcasts."""
    def before(i, t):
        if i not in blocks:
            return t
        p = sets[blocks.index(i)].unsqueeze(0)
        if on_cls:
            return t + p
        return torch.cat([t[:, :1], t[:, 1:] + p], dim=1)

    return run_blocks(bb, embedded(bb, bb.patch_embed(x)), before)


@pytest.mark.parametrize("family", ["vit", "beit"])
@pytest.mark.parametrize("location", ["add", "add-1"])
@pytest.mark.parametrize("mode,blocks", [("shallow", None), ("deep", None), ("deep", "1,3")])
@pytest.mark.parametrize("form", ["paper", "official"])
def test_add_follows_fig5(vit, beit, family, location, mode, blocks, form):
    bb = vit if family == "vit" else beit
    if family == "beit" and blocks is not None:
        blocks = "1"  # the tiny BEiT has 2 blocks
    x = torch.randn(2, 3, *bb.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    m = model_for(bb, location, mode, form, prompt_blocks=blocks)
    sets = m.prompts.add if mode == "deep" else m.prompts.add.unsqueeze(0)
    at = sorted(m.prompt_set_at)
    N = bb.patch_embed.num_patches
    assert sets.shape == (len(at), 1 if location == "add-1" else N + (form == "official"), bb.embed_dim)
    with torch.no_grad():
        want = logits(m, add_reference(bb, x, list(sets), at, on_cls=form == "official"))
        got = m(x)
        assert (got - want).abs().max() <= 1e-5
        # control: the paper's sets on the class token too (or, official, the patches only) differ
        if location == "add-1":
            wrong = add_reference(bb, x, list(sets), at, on_cls=form != "official")
        else:  # the (N, D) part shifted by one row: prompts on the wrong patches
            wrong = add_reference(bb, x, [s.roll(1, dims=0) for s in sets], at, on_cls=form == "official")
        assert (logits(m, wrong) - got).abs().max() > 1e-3


def test_add_leaves_the_mask_row_alone(vit, images):
    """With a VPTM [MASK] token (order ``CXM``) the added set goes to the patch rows only; the readout is h[MASK]."""
    m = model_for(vit, "add", mask_token="learnable", readout_pool="mask")
    assert m.order == "CXM"
    B = images.shape[0]
    with torch.no_grad():
        t = embedded(vit, vit.patch_embed(images))
        t = torch.cat([t[:, :1], t[:, 1:] + m.prompts.add, m.mask_token.expand(B, 1, -1)], dim=1)
        out = run_blocks(vit, t)
        want = m.get_classifier()(vit.norm(out[:, -1]))
        assert (m(images) - want).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ prepend-pixel
def test_prepend_pixel_embeds_pixels_with_the_frozen_projection(vit, images):
    """Np pixel patches through the frozen patch projection (with its bias), no position embedding, placed after
    CLS (official ``prepend-pixel``); control: the same rows with the first patches' position embedding."""
    m = model_for(vit, "prepend-pixel")
    pe = vit.patch_embed
    assert m.prompts.pixels.shape == (3, 3, *pe.patch_size)
    with torch.no_grad():
        strip = torch.cat(list(m.prompts.pixels), dim=-1).unsqueeze(0)  # the official (1, 3, P, P * Np) strip
        rows = conv_tokens(vit, strip, pe.proj.weight, pe.proj.bias)  # (1, Np, D)
        t = embedded(vit, vit.patch_embed(images))
        B = images.shape[0]
        want = logits(m, run_blocks(vit, torch.cat([t[:, :1], rows.expand(B, -1, -1), t[:, 1:]], dim=1)))
        got = m(images)
        assert (got - want).abs().max() <= 1e-5
        rows_pos = rows + vit.pos_embed[:, 1:4]
        wrong = logits(m, run_blocks(vit, torch.cat([t[:, :1], rows_pos.expand(B, -1, -1), t[:, 1:]], dim=1)))
        assert (wrong - got).abs().max() > 1e-3


@pytest.mark.parametrize("family", ["vit", "beit"])
@pytest.mark.parametrize("mode", ["shallow", "gated"])
def test_prepend_pixel_is_prepend_with_the_embedded_pixels(vit, beit, family, mode):
    """prepend-pixel equals prepend whose prompt rows are the embedded pixels (BEiT: zero relative bias on them)."""
    bb = vit if family == "vit" else beit
    x = torch.randn(2, 3, *bb.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    m = model_for(bb, "prepend-pixel", mode)
    ref = PromptedViT(bb, K, mode, 3).eval()
    with torch.no_grad():
        ref.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("prompts.")}, strict=False)
        ref.prompts.shallow.copy_(bb.patch_embed.proj(m.prompts.pixels).flatten(1))
        assert (m(x) - ref(x)).abs().max() <= 1e-5


# ------------------------------------------------------------------------------------------------ concat-channel
@pytest.mark.parametrize("family", ["vit", "beit"])
@pytest.mark.parametrize("form", ["paper", "official"])
def test_concat_channel_widens_the_patch_embedding(vit, beit, family, form):
    """Nc learnable channels after RGB, through the patch projection widened by Nc input channels (paper: new
    weights only; official ``below``: the whole widened projection, initialised from the pretrained one)."""
    bb = vit if family == "vit" else beit
    x = torch.randn(2, 3, *bb.patch_embed.img_size, generator=torch.Generator().manual_seed(1))
    m = model_for(bb, "concat-channel", form=form, Np=2)
    pr, proj = m.prompts, bb.patch_embed.proj
    assert pr.channel.shape == (2, *bb.patch_embed.img_size)
    with torch.no_grad():
        if form == "paper":
            w, b = torch.cat([proj.weight, pr.channel_weight], dim=1), proj.bias
        else:
            w, b = pr.embed_weight, pr.embed_bias
        x4 = torch.cat([x, pr.channel.unsqueeze(0).expand(2, -1, -1, -1)], dim=1)
        got = m(x)
        assert (got - logits(m, run_blocks(bb, embedded(bb, conv_tokens(bb, x4, w, b))))).abs().max() <= 1e-5
        flipped = torch.cat([x, pr.channel.flip(-1).unsqueeze(0).expand(2, -1, -1, -1)], dim=1)  # control
        assert (got - logits(m, run_blocks(bb, embedded(bb, conv_tokens(bb, flipped, w, b))))).abs().max() > 1e-3


def test_concat_channel_init(vit, images):
    """Paper form: the new weights start at zero, so the untrained model is the frozen backbone's; official form:
    the widened projection starts as the pretrained RGB weights and bias plus xavier-uniform new weights."""
    paper = PromptedViT(vit, K, "shallow", 1, prompt_location="concat-channel").eval()
    plain = PromptedViT(vit, K, "none", tune="head").eval()
    plain.head.load_state_dict(paper.head.state_dict())
    with torch.no_grad():
        assert (paper(images) - plain(images)).abs().max() == 0
    off = PromptedViT(vit, K, "shallow", 1, prompt_location="concat-channel", prompt_location_form="official")
    assert torch.equal(off.prompts.embed_weight[:, :3], vit.patch_embed.proj.weight)
    assert torch.equal(off.prompts.embed_bias, vit.patch_embed.proj.bias)
    v = (6 / (3 * 16 + 32)) ** 0.5
    assert 0 < off.prompts.embed_weight[:, 3:].abs().max() <= v


# ------------------------------------------------------------------------------------------------------------ pad
@pytest.mark.parametrize("form", ["paper", "official"])
@pytest.mark.parametrize("p", [2, 1])
def test_pad_surrounds_the_image_and_resizes_positions(vit, images, form, p):
    """Official ``pad``: the image padded by p learnable pixels per side (official form: [0, 1] values normalised
    with ImageNet's mean/std), embedded on the larger grid (16 + 2p px -> floor((16 + 2p) / 4) patches per side:
    p = 1 drops the last 2 px, as the official strided conv does) with the position grid resized linearly, corners
    aligned (``scipy.ndimage.zoom(order=1)``, the official ``load_from``)."""
    m = model_for(vit, "pad", form=form, Np=p)
    pr, B, D = m.prompts, images.shape[0], vit.embed_dim
    H = W = 16
    with torch.no_grad():
        def px(t):
            t = t.unsqueeze(0)
            return (t - IMAGENET[0]) / IMAGENET[1] if form == "official" else t

        xp = torch.zeros(B, 3, H + 2 * p, W + 2 * p)
        xp[:, :, p:p + H, p:p + W] = images
        xp[:, :, p:p + H, :p], xp[:, :, p:p + H, p + W:] = px(pr.pad_left), px(pr.pad_right)
        xp[:, :, :p], xp[:, :, p + H:] = px(pr.pad_top), px(pr.pad_bottom)
        tokens = conv_tokens(vit, xp, vit.patch_embed.proj.weight, vit.patch_embed.proj.bias)
        g = (H + 2 * p) // 4
        grid = vit.pos_embed[0, 1:].reshape(4, 4, D).numpy()
        zoomed = torch.from_numpy(ndimage.zoom(grid, (g / 4, g / 4, 1), order=1)).reshape(1, g * g, D)
        pos = torch.cat([vit.pos_embed[:, :1], zoomed], dim=1)
        t = torch.cat([vit.cls_token.expand(B, -1, -1), tokens], dim=1)
        got = m(images)
        assert m.location.grid(m) == (g, g)
        assert (got - logits(m, run_blocks(vit, t + pos))).abs().max() <= 1e-5
        swapped = pos.clone()
        swapped[:, 1:] = zoomed.flip(1)  # control: the same positions on the wrong patches
        assert (got - logits(m, run_blocks(vit, t + swapped))).abs().max() > 1e-3


def test_pad_intermediates_are_on_the_padded_grid(vit, images):
    m = model_for(vit, "pad", Np=2)
    out = m.forward_intermediates(images, indices=1, intermediates_only=True)
    assert out[0].shape == (3, vit.embed_dim, 5, 5)


# ------------------------------------------------------------------------------- gradients, adapters, defaults
CASES = [("add", "shallow", "paper"), ("add", "deep", "official"), ("add-1", "deep", "paper"),
         ("prepend-pixel", "shallow", "paper"), ("prepend-pixel", "gated", "paper"),
         ("concat-channel", "shallow", "paper"), ("concat-channel", "shallow", "official"),
         ("pad", "shallow", "paper"), ("pad", "shallow", "official")]


@pytest.mark.parametrize("location,mode,form", CASES)
def test_gradients_reach_the_location_tensors_only(vit, images, location, mode, form):
    m = model_for(vit, location, mode, form).train()
    m(images).logsumexp(1).sum().backward()
    names = {n for n, p in m.named_parameters() if p.requires_grad}
    assert names and all(n.startswith(("prompts.", "head.", "gates.")) for n in names)
    assert any(n.startswith("prompts.") for n in names)
    for n, p in m.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().max() > 0, n
        else:
            assert p.grad is None, n
    m.zero_grad(set_to_none=True)


@pytest.mark.parametrize("location,mode,form", CASES)
def test_adapter_round_trip(vit, images, tmp_path, location, mode, form):
    m = model_for(vit, location, mode, form)
    path = tmp_path / "adapter.safetensors"
    m.save_adapter(str(path))
    sd = load_file(str(path))
    assert sd and all(k.startswith(("prompts.", "head.", "gates.")) for k in sd)
    other = PromptedViT(vit, K, mode, 3, prompt_location=location, prompt_location_form=form,
                        generator=torch.Generator().manual_seed(9)).eval()
    with torch.no_grad():
        assert (other(images) - m(images)).abs().max() > 1e-4
        other.load_adapter(str(path))
        assert torch.equal(other(images), m(images))
    wrong = PromptedViT(vit, K, mode, 3, prompt_location="prepend" if location != "prepend" else "add")
    with pytest.raises(UserError, match="does not match the model"):
        wrong.load_adapter(str(path))


@pytest.mark.parametrize("location,form", [("add", "official"), ("add-1", "paper"), ("prepend-pixel", "paper"),
                                           ("concat-channel", "paper"), ("pad", "official")])
def test_save_pretrained_then_load(tmp_path, images, location, form):
    """The library face: ``from_preset`` -> ``save_pretrained`` -> ``vptool.load`` (which builds the prompts with
    a zeros placeholder, then reads the adapter) gives the same logits."""
    import vptool

    m = vptool.from_preset("vpt-shallow", TINY_NAME, K, pretrained=False, backbone_kwargs=dict(TINY_KWARGS),
                           prompt_length=2, prompt_location=location, prompt_location_form=form).eval()
    m.save_pretrained(tmp_path / "adapter")
    back = vptool.load(tmp_path / "adapter").eval()
    assert (back.config.prompt_location, back.config.prompt_location_form) == (location, form)
    with torch.no_grad():
        assert torch.equal(back(images), m(images))


def test_prepend_is_todays_forward(vit, images):
    """The default location is the prompt modes' own rows, bit for bit."""
    for mode in ("shallow", "deep", "gated"):
        a = PromptedViT(vit, K, mode, 3, generator=torch.Generator().manual_seed(3)).eval()
        b = PromptedViT(vit, K, mode, 3, prompt_location="prepend", prompt_location_form="official",
                        generator=torch.Generator().manual_seed(3)).eval()
        with torch.no_grad():
            assert torch.equal(a(images), b(images))
        assert list(a.adapter_state_dict()) == list(b.adapter_state_dict())


@pytest.mark.parametrize("location", ["add", "add-1", "prepend-pixel", "pad"])
def test_zeros_init_is_the_plain_backbone_where_it_should_be(vit, images, location):
    """prompt.init zeros: added zeros (add, add-1) leave the backbone's tokens; zero pixels are still pixels."""
    m = PromptedViT(vit, K, "shallow", 2, prompt_location=location, prompt_init="zeros").eval()
    assert all(p.abs().max() == 0 for p in m.prompts.parameters())
    plain = PromptedViT(vit, K, "none", tune="head").eval()
    plain.head.load_state_dict(m.head.state_dict())
    with torch.no_grad():
        same = (m(images) - plain(images)).abs().max() == 0
    assert same == location.startswith("add")


# ------------------------------------------------------------------------------------------------------ refusals
REFUSED = [
    (dict(prompt_mode="gated", prompt_location="add"), ("prompt.mode", "'gated'", "prompt.location prepend")),
    (dict(prompt_mode="deep", prompt_location="prepend-pixel"), ("prompt.mode", "'deep'", "shallow or gated")),
    (dict(prompt_mode="deep", prompt_location="concat-channel"), ("prompt.mode", "'deep'", "use prompt.mode shallow")),
    (dict(prompt_mode="gated", prompt_location="pad"), ("prompt.mode", "'gated'", "use prompt.mode shallow")),
    (dict(prompt_mode="none", prompt_location="add", tune="head"), ("prompt.location", "prompt.mode none")),
    (dict(prompt_location="add", readout_pool="prompt"), ("readout.pool", "'prompt'", "use cls or avg")),
    (dict(prompt_location="pad", readout_pool="prompt"), ("readout.pool", "'prompt'")),
    (dict(prompt_location="prepend-pixel", prompt_init="kmeans"), ("prompt.init", "'kmeans'", "xavier or zeros")),
    (dict(prompt_location="add", prompt_init="file", prompt_file="x.safetensors"), ("prompt.init", "'file'")),
    (dict(prompt_location="pad", prompt_dropout=0.1), ("prompt.dropout", "0.1", "set prompt.dropout 0")),
]


@pytest.mark.parametrize("options,needles", REFUSED)
def test_refusals_are_one_line(vit, options, needles):
    options = {"prompt_mode": "shallow", "prompt_length": 2, **options}
    with pytest.raises(UserError) as exc:
        PromptedViT(vit, K, **options)
    assert_one_line_naming(exc, *needles)


def test_pad_is_refused_on_beit(beit):
    with pytest.raises(UserError) as exc:
        PromptedViT(beit, K, "shallow", 2, prompt_location="pad")
    assert_one_line_naming(exc, "prompt.location", "'pad'", "beit", "relative position bias")


def test_prompt_values_are_refused_off_prepend(vit):
    with pytest.raises(UserError) as exc:
        PromptedViT(vit, K, "shallow", 2, prompt_location="add", prompt_values=torch.zeros(2, 32))
    assert_one_line_naming(exc, "prompt.init", "'add'")


# ------------------------------------------------------------------------------------------------------- recipes
@pytest.mark.slow
def test_recipe_key_trains_and_reloads(tmp_path):
    """``prompt.location`` / ``prompt.location_form`` through the CLI: a run saves the location's tensors,
    ``vptool.load`` rebuilds the same model, and ``probe-nmi`` refuses it (no prompt tokens) in one line."""
    import vptool

    recipe = tiny_recipe(tmp_path, method="vpt-shallow", prompt={"location": "add", "location_form": "official"},
                         train={"epochs": 1, "warmup_epochs": 0})
    res = invoke_cli("train", str(write_recipe(tmp_path, recipe, "add.yaml")), "--json")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "add"
    assert load_file(str(run / "adapter.safetensors"))["prompts.add"].shape == (17, 32)
    model = vptool.load(run)
    assert (model.config.prompt_location, model.config.prompt_location_form) == ("add", "official")
    res = invoke_cli("probe-nmi", str(run))  # the NMI probe compares prompt tokens with patches: add has none
    assert res.exit_code == 2 and "prompt.location: 'add' adds no prompt tokens" in res.stderr


def test_recipe_refusals_exit_2_before_training(tmp_path):
    one = {"epochs": 1, "warmup_epochs": 0}
    bad = tiny_recipe(tmp_path, prompt={"location": "pad", "mode": "deep"}, train=one)
    res = invoke_cli("train", str(write_recipe(tmp_path, bad, "bad.yaml")))
    assert res.exit_code == 2 and "prompt.mode: 'deep' with prompt.location 'pad'" in res.stderr
    # SPT's k-means builds prompt tokens: refused before any token is clustered
    spt = tiny_recipe(tmp_path, prompt={"location": "add", "init": "kmeans"}, train=one)
    res = invoke_cli("train", str(write_recipe(tmp_path, spt, "spt.yaml")))
    assert res.exit_code == 2 and "prompt.location: 'add' trains no prompt tokens" in res.stderr
    # zero channel and zero new weights never move: a recipe refuses them (a loaded adapter may build them)
    dead = tiny_recipe(tmp_path, prompt={"location": "concat-channel", "init": "zeros", "length": 1}, train=one)
    res = invoke_cli("train", str(write_recipe(tmp_path, dead, "dead.yaml")))
    assert res.exit_code == 2 and "prompt.init: 'zeros' with prompt.location concat-channel" in res.stderr
    assert not (tmp_path / "runs").exists()


SHIPPED = ["add", "add-1", "prepend-pixel", "concat-channel", "pad"]


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_location_recipes_load(name):
    from pathlib import Path

    from vptool.recipe import load_recipe

    path = Path(__file__).resolve().parent.parent / "recipes" / f"vpt_location_{name.replace('-', '_')}_digits.yaml"
    r = load_recipe(str(path))
    assert r.prompt.location == name and np.isfinite(r.train.lr)


#: shipped 20 epochs; 10 here (CI time). Measured at 20 epochs (seed 0, CPU): add 98.3 %, add-1 98.3 %, prepend-pixel
#: 98.1 %, concat-channel 98.1 %, pad 97.5 % test top-1.
LOCATION_EPOCHS = 10


@pytest.mark.slow
@pytest.mark.parametrize("name", ["add", "prepend-pixel"])
def test_digits_location_recipe_trains_end_to_end(name, tmp_path):
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "recipes" / f"vpt_location_{name.replace('-', '_')}_digits.yaml"
    res = invoke_cli("train", str(path), "--json", "--set", f"output.dir={tmp_path}", "--set",
                     f"train.epochs={LOCATION_EPOCHS}")
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout)
    assert summary["test_top1"] >= 90.0, summary
    ev = invoke_cli("eval", str(tmp_path / path.stem), "--json")
    assert ev.exit_code == 0 and json.loads(ev.stdout)["top1"] == summary["test_top1"]
