"""The variants VPT ablates (Jia et al. 2022): prompt depth (Fig. 7, ``prompt.blocks``) and the final output
(Fig. 8, ``readout.pool: prompt``), against forwards written here from the paper's description with timm's own
blocks, in the concatenated form."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY_KWARGS, TINY_NAME, invoke_cli, tiny_recipe, write_recipe
from safetensors.torch import load_file

from vptool.backbones.build import build_backbone
from vptool.config import ModelConfig, blocks_spec
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT
from vptool.prompting.modes import mode_for

L = 4  # blocks of the backbone these tests prompt


@pytest.fixture
def backbone4():
    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs={**TINY_KWARGS, "depth": L})
    return bb


@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def reference_depth(bb, x, sets, blocks):
    """VPT Fig. 7 as the official code's NUM_DEEP_LAYERS / REVERSE_DEEP run it, concatenated: at block b (0-based)
    in ``blocks`` the set ``sets[blocks.index(b)]`` is placed after CLS, replacing the prompt rows the block before
    output (inserted when there are none); any other block runs on the rows it gets. Returns the tokens after the
    last block and whether they hold prompt rows."""
    B, Np = x.shape[0], sets.shape[1]
    t = torch.cat([bb.cls_token.expand(B, -1, -1), bb.patch_embed(x)], dim=1) + bb.pos_embed
    has_rows = False
    for i, blk in enumerate(bb.blocks):
        if i in blocks:
            patches = t[:, 1 + Np:] if has_rows else t[:, 1:]
            t = torch.cat([t[:, :1], sets[blocks.index(i)].expand(B, -1, -1), patches], dim=1)
            has_rows = True
        t = blk(t)
    return t, has_rows


def pooled(t, has_rows, Np, pool):
    """The readout before its norm: CLS, the mean of the patch tokens or of the prompt tokens (Fig. 8)."""
    first = 1 + Np if has_rows else 1
    return {"cls": t[:, 0], "avg": t[:, first:].mean(1), "prompt": t[:, 1:1 + Np].mean(1)}[pool]


@pytest.mark.parametrize("blocks", ["1-4", "1-2", "3-4", "1", "4", "1,3", "2"])
@pytest.mark.parametrize("pool", ["cls", "avg", "prompt"])
@pytest.mark.parametrize("form", ["prefix", "concat"])
def test_prompt_blocks_follow_fig7(backbone4, images, blocks, pool, form):
    Np = 3
    model = PromptedViT(backbone4, 5, "deep", Np, prompt_blocks=blocks, readout_pool=pool, readout_norm="none",
                        deep_form=form).eval()
    want_blocks = {"1-4": [0, 1, 2, 3], "1-2": [0, 1], "3-4": [2, 3], "1": [0], "4": [3], "1,3": [0, 2],
                   "2": [1]}[blocks]
    with torch.no_grad():
        model.prompts.deep.normal_(generator=torch.Generator().manual_seed(2))  # prompts of real magnitude
        assert model.prompts.deep.shape == (len(want_blocks), Np, 32)
        t, has_rows = reference_depth(backbone4, images, model.prompts.deep, want_blocks)
        want = pooled(t, has_rows, Np, pool)
        got = model.forward_head(model.forward_features(images), pre_logits=True)
        assert (got - want).abs().max() <= 1e-5
        # control: the same sets at other blocks give other features
        other = [b for b in range(L) if b not in want_blocks][:len(want_blocks)]
        if len(other) == len(want_blocks):
            t2, rows2 = reference_depth(backbone4, images, model.prompts.deep, other)
            assert (pooled(t2, rows2, Np, pool) - got).abs().max() > 1e-3


def test_blocks_1_to_L_is_bitwise_todays_deep(backbone4, images):
    """``prompt.blocks: 1-L`` draws the same prompts from the same seed and computes the same logits, bit for bit."""
    models = [PromptedViT(backbone4, 5, "deep", 3, prompt_blocks=spec,
                          generator=torch.Generator().manual_seed(7)).eval() for spec in (None, f"1-{L}")]
    assert torch.equal(models[0].prompts.deep, models[1].prompts.deep)
    with torch.no_grad():
        models[1].head.load_state_dict(models[0].head.state_dict())
        assert torch.equal(models[0](images), models[1](images))
    assert blocks_spec(list(range(1, L + 1))) == f"1-{L}" and blocks_spec("all") is None


def test_deep_at_block_1_is_vpt_shallow(backbone4, images):
    shallow = PromptedViT(backbone4, 5, "shallow", 3).eval()
    deep = PromptedViT(backbone4, 5, "deep", 3, prompt_blocks=1).eval()
    with torch.no_grad():
        deep.prompts.deep.copy_(shallow.prompts.shallow.unsqueeze(0))
        deep.head.load_state_dict(shallow.head.state_dict())
        assert (deep(images) - shallow(images)).abs().max() <= 1e-5


@pytest.mark.parametrize("mode", ["shallow", "gated", "deep"])
def test_prompt_pool_is_the_mean_of_the_final_prompt_tokens(backbone4, images, mode):
    """Fig. 8 Prompt-pool on every prompted mode: shallow/gated prompts are rows to the end; deep keeps the last
    block's prompt outputs."""
    model = PromptedViT(backbone4, 5, mode, 3, readout_pool="prompt", readout_norm="pretrained").eval()
    with torch.no_grad():
        tokens = model.forward_features(images)
        sl = model.slices(model.output_order, 16)
        n = backbone4.norm
        want = F.layer_norm(tokens[:, sl["P"]].mean(1), (32,), n.weight, n.bias, n.eps)
        assert torch.allclose(model.forward_head(tokens, pre_logits=True), want, atol=1e-6)
        if mode == "deep":  # the prompt rows are those of the concatenated forward
            t, _ = reference_depth(backbone4, images, model.prompts.deep, list(range(L)))
            assert (tokens[:, sl["P"]] - t[:, 1:4]).abs().max() <= 1e-5


def test_refusals_name_the_key(backbone4):
    with pytest.raises(UserError, match=r"prompt.blocks: '1-2' .*prompt.mode shallow"):
        PromptedViT(backbone4, 5, "shallow", 3, prompt_blocks="1-2")
    with pytest.raises(UserError, match=r"prompt.blocks: block 5 is outside this backbone's blocks 1-4"):
        PromptedViT(backbone4, 5, "deep", 3, prompt_blocks="3-5")
    with pytest.raises(UserError, match=r"readout.pool: 'prompt'.*prompt.mode none"):
        PromptedViT(backbone4, 5, "none", readout_pool="prompt", tune="head")
    with pytest.raises(ValueError, match=r"prompt_blocks: '0-3' is not a block list"):
        ModelConfig(prompt_blocks="0-3").validate()


def test_spt_init_levels_follow_the_blocks():
    """SPT (``same``): the set entering 1-based block b is built from the tokens entering it, level b - 1."""
    deep = mode_for("deep")
    assert deep.init_levels(12, "same", "7-12") == [6, 7, 8, 9, 10, 11]
    assert deep.init_levels(12, "same", None) == list(range(12))
    assert deep.init_levels(12, "last", "1,5") == [12, 12]
    assert deep.shape(12, 10, 768, "1-6") == (6, 10, 768)


def test_recipe_key_trains_saves_and_reloads(tmp_path):
    """``prompt.blocks`` through the CLI: bad values exit 2 naming the key and write nothing; a run with blocks
    3-4 saves (2, Np, D) prompts and its adapter reloads with the same logits."""
    import vptool

    bad = write_recipe(tmp_path, tiny_recipe(tmp_path, prompt={"blocks": "3-9"}), "bad.yaml")
    res = invoke_cli("train", str(bad))
    assert res.exit_code == 2 and "prompt.blocks: block 9 is outside this backbone's blocks 1-2" in res.stderr
    assert not (tmp_path / "runs").exists()
    res = invoke_cli("train", str(write_recipe(tmp_path, tiny_recipe(tmp_path, prompt={"blocks": "x"}), "x.yaml")))
    assert res.exit_code == 2 and "prompt.blocks: 'x' is not a block list" in res.stderr
    good = write_recipe(tmp_path, tiny_recipe(tmp_path, prompt={"blocks": [2]}, train={"epochs": 1,
                                                                                    "warmup_epochs": 0}), "good.yaml")
    res = invoke_cli("train", str(good), "--json")
    assert res.exit_code == 0, res.output
    run = tmp_path / "runs" / "good"
    assert load_file(str(run / "adapter.safetensors"))["prompts.deep"].shape == (1, 4, 32)
    model = vptool.load(run)  # the saved config rebuilds the model with the set at block 2 only
    assert model.config.prompt_blocks == "2" and model.prompt_set_at == {1: 0}


def test_nmi_probe_marks_blocks_before_the_first_set(backbone4, images):
    """Blocks no prompt enters have no NMI (null in the JSON); a prompted block without prompts is still refused;
    a block without a set is probed with the prompt rows carried in (those the concatenated forward computes)."""
    from vptool.analysis.nmi import NMIRecorder, block_inputs, summarize

    model = PromptedViT(backbone4, 5, "deep", 3, prompt_blocks="2").eval()
    rec = NMIRecorder(L, unprompted=(0,))
    with torch.no_grad():
        inputs = list(block_inputs(model, images))
        for i, p, e in inputs:
            rec(i, p, e)
        t = torch.cat([backbone4.cls_token.expand(3, -1, -1), backbone4.patch_embed(images)], 1) + backbone4.pos_embed
        t = backbone4.blocks[0](t)
        t = backbone4.blocks[1](torch.cat([t[:, :1], model.prompts.deep[0].expand(3, -1, -1), t[:, 1:]], 1))
        assert (inputs[2][1] - t[:, 1:4]).abs().max() <= 1e-5  # block 3's prompts: block 2's prompt outputs
    s = summarize(rec.values(), rec.saturation())
    assert s["nmi_mean"][0] is None and all(v is not None for v in s["nmi_mean"][1:])
    with pytest.raises(ValueError, match="no prompts"):
        NMIRecorder(L)(0, None, images.new_zeros(1, 16, 32))
