"""GateVPT and VPTM on the one prompted forward, against forwards written here from the papers' equations.

The references below never call the code under test nor timm's blocks: each transformer block is spelled out
from its raw weights (pre-norm LayerNorm, qkv projection, softmax((q k^T * d_h^-1/2 + bias) / tau), output
projection, optional layer scale, GELU MLP), so a wrong temperature, gate, bias placement, token order or
readout in ``vptool.prompting`` shows up as a mismatch.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from beit_layout import HEADS as BEIT_HEADS
from beit_layout import INDEX_KEY, random_beitv2_sd, write_beitv2
from beit_layout import NAME as BEIT_NAME
from beit_layout import TINY as BEIT_TINY
from conftest import TINY_KWARGS, TINY_NAME, assert_one_line_naming

from vptool.analysis.gates import gate_weights, selection_ratio
from vptool.backbones.build import build_backbone
from vptool.errors import UserError
from vptool.prompting.model import PromptedViT

EPS = 1e-6


# ----------------------------------------------------------------------------------------------- references
def ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=EPS)


def ref_block(sd, i, x, heads, tau=1.0, bias=None):
    """Block i from raw tensors: x + g1 * Attn(LN1 x), then + g2 * MLP(LN2 x); logits / tau (GateVPT eq. 9)."""
    b = f"blocks.{i}."
    B, T, D = x.shape
    hd = D // heads
    h = ln(x, sd, b + "norm1")
    if b + "attn.q_bias" in sd:  # BEiT: q and v biases, no k bias
        qkv_b = torch.cat([sd[b + "attn.q_bias"], torch.zeros(D), sd[b + "attn.v_bias"]])
    else:
        qkv_b = sd[b + "attn.qkv.bias"]
    q, k, v = (h @ sd[b + "attn.qkv.weight"].T + qkv_b).reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
    logits = q @ k.transpose(-2, -1) * hd ** -0.5
    if bias is not None:
        logits = logits + bias
    a = (logits / tau).softmax(-1)
    o = (a @ v).transpose(1, 2).reshape(B, T, D) @ sd[b + "attn.proj.weight"].T + sd[b + "attn.proj.bias"]
    x = x + sd.get(b + "gamma_1", 1.0) * o
    m = F.gelu(ln(x, sd, b + "norm2") @ sd[b + "mlp.fc1.weight"].T + sd[b + "mlp.fc1.bias"])
    m = m @ sd[b + "mlp.fc2.weight"].T + sd[b + "mlp.fc2.bias"]
    return x + sd.get(b + "gamma_2", 1.0) * m


def vit_tokens(sd, img):
    """[CLS, E] + E_pos for a timm-layout ViT state dict (VPT eq. 1-2)."""
    w = sd["patch_embed.proj.weight"]
    e = F.conv2d(img, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    return torch.cat([sd["cls_token"].expand(img.shape[0], -1, -1), e], dim=1) + sd["pos_embed"]


def ref_gated(sd, img, prompts, gamma, taus, heads):
    """GateVPT Alg. 1 with eq. 9 temperatures: [CLS, P, E]; after block l < L the prompt rows become
    sigmoid(gamma_l) * out + (1 - sigmoid(gamma_l)) * in; the last block is not gated."""
    x = vit_tokens(sd, img)
    Np, L = prompts.shape[0], len(taus)
    x = torch.cat([x[:, :1], prompts.expand(x.shape[0], -1, -1), x[:, 1:]], dim=1)
    for i in range(L):
        if i == L - 1:
            x = ref_block(sd, i, x, heads, taus[i])
        else:
            g = torch.sigmoid(gamma[i])
            p_in = x[:, 1:1 + Np]
            x = ref_block(sd, i, x, heads, taus[i])
            x = torch.cat([x[:, :1], g * x[:, 1:1 + Np] + (1 - g) * p_in, x[:, 1 + Np:]], dim=1)
    return x


def ref_vptm(sd, img, prompts, order, heads, taus=None):
    """VPTM eq. 6 on BEiT v2 from the raw pretraining tensors: rows in ``order`` over C, X, P, M; relative
    position bias on CLS/patch pairs only (zero for prompts and [MASK]); returns LN(h)[MASK] (B, D)."""
    B = img.shape[0]
    w = sd["patch_embed.proj.weight"]
    e = F.conv2d(img, w, sd["patch_embed.proj.bias"], stride=w.shape[-1]).flatten(2).transpose(1, 2)
    parts = {"C": sd["cls_token"].expand(B, -1, -1), "X": e, "P": prompts.expand(B, -1, -1),
             "M": sd["mask_token"].expand(B, -1, -1)}
    x = torch.cat([parts[c] for c in order], dim=1)
    T0 = 1 + e.shape[1]
    table = sd["rel_pos_bias.relative_position_bias_table"][sd[INDEX_KEY].reshape(-1)]
    rel = table.reshape(T0, T0, heads).permute(2, 0, 1)
    pos, start = {}, 0
    for c in order:
        pos[c] = list(range(start, start + parts[c].shape[1]))
        start += parts[c].shape[1]
    cx = torch.tensor(pos["C"] + pos["X"])  # rows of CLS then patches, in the table's order
    bias = torch.zeros(heads, x.shape[1], x.shape[1])
    bias[:, cx[:, None], cx[None, :]] = rel
    depth = sum(k.startswith("blocks.") and k.endswith(".gamma_1") for k in sd)
    for i in range(depth):
        x = ref_block(sd, i, x, heads, 1.0 if taus is None else taus[i], bias)
    return ln(x[:, pos["M"][0]], sd, "norm")


# ----------------------------------------------------------------------------------------------- fixtures
@pytest.fixture
def images():
    return torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))


@pytest.fixture
def vit4():
    """Tiny ViT with 4 blocks (3 gates) and its raw state dict."""
    torch.manual_seed(0)
    bb, _ = build_backbone(TINY_NAME, pretrained=False, kwargs={**TINY_KWARGS, "depth": 4})
    return bb, {k: v.detach().clone() for k, v in bb.state_dict().items()}


@pytest.fixture
def beit(tmp_path):
    """Tiny BEiT v2 built from a pretraining checkpoint written in the official layout, and its raw tensors."""
    sd = random_beitv2_sd(seed=3)
    path = write_beitv2(sd, tmp_path / "beitv2_pt.pth")
    bb, info = build_backbone(BEIT_NAME, pretrained=False, checkpoint=str(path), kwargs=dict(BEIT_TINY))
    return bb, info, sd


def beit_images():
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(4))


def randomise(model, seed=5):
    """Give every added tensor (prompts, head, verbalizer prototypes, ...) a non-trivial value."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name in model.adapter_state_dict():
            if name in ("gates.logit", "temperature") or name.startswith("backbone."):
                continue
            param = dict(model.named_parameters())[name]
            param.copy_(0.5 * torch.randn(param.shape, generator=g))


# ----------------------------------------------------------------------------------------------- GateVPT
@pytest.mark.parametrize("pool", ["avg_all", "cls"])
def test_gated_forward_matches_alg1_with_temperatures(vit4, images, pool):
    bb, sd = vit4
    model = PromptedViT(bb, 5, "gated", 6, readout_pool=pool, readout_norm="pretrained",
                        temperature="learnable").eval()
    randomise(model)
    with torch.no_grad():
        model.gates.logit.copy_(torch.tensor([-1.5, 0.3, 2.0]))
        model.temperature.copy_(torch.tensor([0.5, 1.7, 0.8, 3.0]))
        tokens = ref_gated(sd, images, model.prompts.shallow, model.gates.logit, model.temperature, heads=2)
        feat = tokens[:, 1:].mean(1) if pool == "avg_all" else tokens[:, 0]
        want = ln(feat, sd, "norm") @ model.head.weight.T + model.head.bias
        got = model(images)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the gates and temperatures matter: plain VPT-shallow differs clearly
    with torch.no_grad():
        plain = ref_gated(sd, images, model.prompts.shallow, torch.full((3,), 50.0), torch.ones(4), heads=2)
    assert (plain - tokens).abs().max() > 1e-2


@pytest.mark.parametrize("temperature", ["fixed", "learnable"])
def test_gates_all_open_with_unit_temperature_is_vpt_shallow(vit4, images, temperature):
    bb, _ = vit4
    gated = PromptedViT(bb, 5, "gated", 4, readout_pool="avg_all", temperature=temperature).eval()
    shallow = PromptedViT(bb, 5, "shallow", 4, readout_pool="avg_all").eval()
    randomise(gated)
    with torch.no_grad():
        gated.gates.logit.fill_(60.0)  # sigmoid(60) == 1.0 in float32: every gate fully open
        shallow.prompts.shallow.copy_(gated.prompts.shallow)
        shallow.head.load_state_dict(gated.head.state_dict())
        a, b = gated(images), shallow(images)
    assert torch.sigmoid(torch.tensor(60.0)) == 1.0
    torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


def test_hard_gates_are_zero_one_forward_with_straight_through_gradient(vit4, images):
    bb, sd = vit4
    model = PromptedViT(bb, 5, "gated", 4, readout_pool="avg_all", gate_kind="hard")
    randomise(model)
    with torch.no_grad():
        model.gates.logit.copy_(torch.tensor([3.0, -3.0, 0.5]))
    # evaluation: g = 1[gamma > 0] -> same as Alg. 1 with gates (1, 0, 1)
    model.eval()
    with torch.no_grad():
        tokens = ref_gated(sd, images, model.prompts.shallow, torch.tensor([60.0, -60.0, 60.0]), torch.ones(4), 2)
        want = ln(tokens[:, 1:].mean(1), sd, "norm") @ model.head.weight.T + model.head.bias
        torch.testing.assert_close(model(images), want, atol=1e-5, rtol=0)
    # training: every sampled gate value is exactly 0 or 1, and gamma still gets a gradient (straight-through)
    model.train()
    torch.manual_seed(0)
    values = model.gates.values(64)
    assert values.shape == (64, 3)
    assert set(values.detach().unique().tolist()) <= {0.0, 1.0}
    # P(open) = sigmoid(gamma) for a logistic-noise sample: gamma 3 -> 0.95, -3 -> 0.05
    freq = values.detach().mean(0)
    assert freq[0] > 0.8 and freq[1] < 0.2
    F.cross_entropy(model(images), torch.tensor([0, 1, 2])).backward()
    assert model.gates.logit.grad is not None and model.gates.logit.grad.abs().sum() > 0


def test_temperature_is_clamped_in_forward_and_projected_after_a_step(vit4, images):
    bb, _ = vit4
    model = PromptedViT(bb, 5, "gated", 3, temperature="learnable", temperature_range=(0.01, 10.0)).eval()
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.001, 50.0, 1.0, 2.0]))
    assert model.temperatures().tolist() == pytest.approx([0.01, 10.0, 1.0, 2.0])
    model.constrain_()
    assert model.temperature.detach().tolist() == pytest.approx([0.01, 10.0, 1.0, 2.0])


@pytest.mark.parametrize("gates,want", [
    ([0.5, 0.5, 0.5], [1 / 7, 2 / 7, 4 / 7]),  # g~ = (0.125, 0.25, 0.5)
    ([1.0, 0.0, 0.2], [0.8, 0.0, 0.2]),  # g~ = (1 * 1 * 0.8, 0 * 0.8, 0.2)
    ([0.9, 0.6], [0.36 / 0.96, 0.6 / 0.96]),  # g~ = (0.9 * 0.4, 0.6)
    ([0.3], [1.0]),
])
def test_selection_ratio_on_hand_picked_gates(gates, want):
    r = selection_ratio(torch.tensor(gates))
    assert r.tolist() == pytest.approx(want, abs=1e-6)
    assert r.sum().item() == pytest.approx(1.0)


def test_selection_ratio_undefined_when_every_gate_is_closed():
    assert gate_weights(torch.zeros(3)).tolist() == [0.0, 0.0, 0.0]
    assert selection_ratio(torch.zeros(3)) is None


# ----------------------------------------------------------------------------------------------- VPTM
def vptm_model(bb, info, order="CXPM", **kw):
    kw = {"prompt_init": "zeros", "readout_pool": "mask", "readout_norm": "pretrained", "mask_token": "auto",
          "head": "verbalizer", "head_dim": 8, **kw}
    return PromptedViT(bb, 4, "shallow", 3, token_order=order, pretrained_mask_token=info.extras.get("mask_token"),
                       **kw).eval()


def test_vptm_mask_output_on_tiny_beitv2_from_pretraining_checkpoint(beit):
    bb, info, sd = beit
    model = vptm_model(bb, info)
    assert model.mask_source == "pretrained"
    randomise(model)
    img = beit_images()
    with torch.no_grad():
        h = ref_vptm(sd, img, model.prompts.shallow, "CXPM", BEIT_HEADS)
        v = model.verbalizer
        u = h @ v.proj.weight.T + v.proj.bias  # eq. 7
        want = u @ v.prototypes.T  # eq. 8
        got = model(img)
    torch.testing.assert_close(model.forward_head(model.forward_features(img), pre_logits=True), h, atol=1e-5,
                               rtol=0)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    # the relative position bias is really applied to CLS/patch pairs: without it the output moves
    sd_flat = dict(sd, **{"rel_pos_bias.relative_position_bias_table": torch.zeros_like(
        sd["rel_pos_bias.relative_position_bias_table"])})
    with torch.no_grad():
        assert (ref_vptm(sd_flat, img, model.prompts.shallow, "CXPM", BEIT_HEADS) - h).abs().max() > 1e-3


def test_vptm_with_temperature_on_beit_divides_bias_too(beit):
    bb, info, sd = beit
    model = vptm_model(bb, info, temperature="learnable")
    randomise(model)
    img = beit_images()
    with torch.no_grad():
        model.temperature.copy_(torch.tensor([0.6, 2.5]))
        h = ref_vptm(sd, img, model.prompts.shallow, "CXPM", BEIT_HEADS, taus=[0.6, 2.5])
        torch.testing.assert_close(model.forward_head(model.forward_features(img), pre_logits=True), h,
                                   atol=1e-5, rtol=0)


def test_four_token_orders_give_the_same_logits(beit):
    """Extra tokens carry no position (zero relative bias, no absolute embedding): attention is
    permutation-equivariant, so CXPM, CXMP, CPMX and CMPX differ only by float rounding."""
    bb, info, sd = beit
    img = beit_images()
    logits = {}
    for order in ("CXPM", "CXMP", "CPMX", "CMPX"):
        model = vptm_model(bb, info, order=order)
        randomise(model)  # same seed: same prompts and verbalizer in every order
        with torch.no_grad():
            logits[order] = model(img)
            # and each order matches the reference built in that order
            h = ref_vptm(sd, img, model.prompts.shallow, order, BEIT_HEADS)
            torch.testing.assert_close(model.forward_head(model.forward_features(img), pre_logits=True), h,
                                       atol=1e-5, rtol=0)
    for order, value in logits.items():
        torch.testing.assert_close(value, logits["CXPM"], atol=1e-5, rtol=0, msg=order)
    assert logits["CXPM"].abs().max() > 1e-2  # not trivially equal (zero logits)


def test_mask_token_learnable_when_the_backbone_has_none(vit4, images):
    bb, _ = vit4
    model = PromptedViT(bb, 5, "shallow", 3, readout_pool="mask", mask_token="auto", head="verbalizer")
    assert model.mask_source == "learned"
    assert model.mask_token.requires_grad and model.mask_token.shape == (1, 32)
    assert "mask_token" in model.adapter_state_dict()
    with pytest.raises(UserError) as exc:
        PromptedViT(bb, 5, "shallow", 3, readout_pool="mask", mask_token="pretrained")
    assert_one_line_naming(exc, "tokens.mask", "pretrained")


def test_pretrained_mask_token_is_frozen_and_not_in_the_adapter(beit):
    bb, info, sd = beit
    model = vptm_model(bb, info)
    assert torch.equal(model.mask_token, sd["mask_token"].reshape(1, -1))
    assert not any(p is model.mask_token for p in model.parameters())
    assert "mask_token" not in model.adapter_state_dict()


@pytest.mark.parametrize("head,names", [
    ("mlp1", {"head.weight", "head.bias"}),
    ("mlp2", {"head.fc1.weight", "head.fc1.bias", "head.fc2.weight", "head.fc2.bias"}),
])
def test_vptm_mlp_baselines(beit, head, names):
    bb, info, sd = beit
    model = vptm_model(bb, info, head=head)
    randomise(model)
    img = beit_images()
    with torch.no_grad():
        h = ref_vptm(sd, img, model.prompts.shallow, "CXPM", BEIT_HEADS)
        m = model.head
        want = (h @ m.weight.T + m.bias if head == "mlp1" else
                F.gelu(h @ m.fc1.weight.T + m.fc1.bias) @ m.fc2.weight.T + m.fc2.bias)
        torch.testing.assert_close(model(img), want, atol=1e-5, rtol=0)
    assert names <= set(model.adapter_state_dict())
    if head == "mlp2":
        assert m.fc1.out_features == 8  # head.dim is the hidden width


def test_bad_token_order_is_one_line(vit4):
    bb, _ = vit4
    with pytest.raises(UserError) as exc:
        PromptedViT(bb, 5, "shallow", 3, mask_token="auto", token_order="XCPM")
    assert_one_line_naming(exc, "tokens.order", "XCPM")


# ----------------------------------------------------------------------------------------------- composability
def _recipe(method, backbone, **sections):
    from vptool.recipe import deep_merge, resolve

    raw = deep_merge({"method": method, "backbone": {"name": "x"}, "data": {"dataset": "digits"}}, sections)
    return resolve(raw)


#: (case id, method preset, recipe sections over the preset); every row runs on both backbone kinds.
CASES = [
    ("linear", "linear", {}),
    ("full", "full", {}),
    ("vpt-shallow", "vpt-shallow", {}),
    ("vpt-deep", "vpt-deep", {}),
    ("gatevpt", "gatevpt", {"prompt": {"length": 5}}),
    ("vptm", "vptm", {"head": {"dim": 8}}),
    # cross-paper combinations the papers never ran
    ("gated+temperature+verbalizer", "gatevpt",
     {"prompt": {"length": 5}, "head": {"type": "verbalizer", "dim": 8}}),
    ("vptm+deep", "vptm", {"prompt": {"mode": "deep", "length": 3}, "head": {"dim": 8}}),
    ("hard-gates+mlp2+mask", "gatevpt",
     {"prompt": {"length": 4, "gate": "hard"}, "tokens": {"mask": "auto", "order": "CMPX"},
      "readout": {"pool": "mask"}, "head": {"type": "mlp2", "dim": 8}}),
    ("vpt-deep+temperature+avg_all", "vpt-deep",
     {"attention": {"temperature": "learnable"}, "readout": {"pool": "avg_all"}}),
]


@pytest.fixture(scope="module")
def beit_module(tmp_path_factory):
    sd = random_beitv2_sd(seed=3)
    path = write_beitv2(sd, tmp_path_factory.mktemp("beit") / "beitv2_pt.pth")
    return build_backbone(BEIT_NAME, pretrained=False, checkpoint=str(path), kwargs=dict(BEIT_TINY))


@pytest.mark.parametrize("kind", ["vit", "beitv2"])
@pytest.mark.parametrize("case,method,sections", CASES, ids=[c[0] for c in CASES])
def test_every_preset_and_combination_trains_one_step(case, method, sections, kind, beit_module, tmp_path):
    from vptool.engine.setup import build_model
    from vptool.engine.train import make_optimizer

    if kind == "vit":
        torch.manual_seed(0)
        bb, info = build_backbone(TINY_NAME, pretrained=False, kwargs=dict(TINY_KWARGS))
        img = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    else:
        bb, info = beit_module
        bb = __import__("copy").deepcopy(bb)  # "full" trains the backbone: keep the shared one intact
        img = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    recipe = _recipe(method, kind, **sections)
    K = 5
    model = build_model(recipe, bb, info, K)
    y = torch.tensor([0, 1, 2, 3])
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable, case

    model.train()
    logits = model(img)
    assert logits.shape == (4, K)
    loss = F.cross_entropy(logits, y)
    assert torch.isfinite(loss)
    opt = make_optimizer(recipe, model.trainable_parameters())
    opt.zero_grad()
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in trainable), f"{case}: gradient on {n} is {p.grad is not None}"
    opt.step()
    model.constrain_()
    for n, before in frozen_before.items():
        assert torch.equal(dict(model.named_parameters())[n], before), f"{case}: frozen {n} changed"

    # the adapter holds exactly the trainable tensors (+ fresh fc_norm), never the frozen backbone
    adapter = model.adapter_state_dict()
    if recipe.train.tune != "all":
        assert not any(k.startswith("backbone.") for k in adapter)
        assert trainable <= set(adapter) | {n for n in trainable if n.startswith("fc_norm")}
    path = tmp_path / "adapter.safetensors"
    model.save_adapter(str(path))
    model.eval()
    with torch.no_grad():
        want = model(img)
    fresh = build_model(recipe, __import__("copy").deepcopy(bb) if recipe.train.tune == "all" else bb, info, K)
    fresh.load_adapter(str(path))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(img), want), case


@pytest.mark.parametrize("temperature", ["fixed", "learnable"])
def test_deep_prefix_form_equals_concatenated_form_on_beit_with_mask(beit, temperature):
    """The prefix form (deep prompts as extra keys/values, zero relative bias on their columns) equals running
    each block on the concatenated sequence, on BEiT with a [MASK] token and temperatures too."""
    bb, info, _ = beit
    img = beit_images()
    out = {}
    for form in ("prefix", "concat"):
        model = PromptedViT(bb, 4, "deep", 3, readout_pool="mask", mask_token="auto", deep_form=form,
                            pretrained_mask_token=info.extras["mask_token"], temperature=temperature).eval()
        randomise(model)
        if model.temperature is not None:
            with torch.no_grad():
                model.temperature.copy_(torch.tensor([0.7, 1.9]))
        with torch.no_grad():
            out[form] = model.forward_features(img)
    torch.testing.assert_close(out["prefix"], out["concat"], atol=1e-5, rtol=0)


def test_beit_with_per_block_relative_bias_matches_timm_without_prompts():
    """timm's default (fine-tuned) BEiT v2 has a relative position bias per block: with no prompts and no extra
    tokens the prompted forward must reproduce timm's own Beit.forward_features."""
    torch.manual_seed(0)
    bb, _ = build_backbone(BEIT_NAME, pretrained=False, kwargs=dict(BEIT_TINY))
    assert bb.rel_pos_bias is None and bb.blocks[0].attn.relative_position_bias_table is not None
    with torch.no_grad():
        for blk in bb.blocks:  # timm initialises the tables to zero: give them values that matter
            blk.attn.relative_position_bias_table.normal_(std=0.5)
    model = PromptedViT(bb, 4, "none", readout_pool="avg", tune="head").eval()
    img = beit_images()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(img), bb.forward_features(img), atol=1e-5, rtol=0)
