"""The prompted forward: one frozen timm ViT or BEiT, prompt tokens, extra tokens, a readout and a head.

Every method is a point in one option space (DESIGN.md §1); presets in ``vptool.recipe`` name the points the
papers use. The axes, each independent of the others:

- prompt mode ``none`` / ``shallow`` / ``deep`` / ``gated``, each a unit in ``vptool.prompting.modes`` (its shapes,
  tensor names and how it runs block i; ``_blocks`` hands every block to it):
  - ``shallow`` (VPT, Jia et al. 2022, eq. 4-5): one set P (Np, D) inserted once and carried through every block.
  - ``deep`` (VPT eq. 7): L sets P (L, Np, D); set i enters block i+1 and the block's prompt outputs are dropped.
    Computed in the prefix form (``attention.prompted_attention(prefix=...)``), equal to the concatenated form on every
    other row. When the readout needs the last block's prompt outputs (``avg_all``, ``prompt``) the last block runs
    concatenated. ``prompt.blocks`` (Fig. 7) gives sets to some blocks only, (S, Np, D); a block without a set
    carries the prompt rows it is given.
  - ``gated`` (GateVPT, Yoo et al. 2023, eq. 6-8, Alg. 1): shallow prompts; after block l (l = 1..L-1, not the
    last) the prompt rows become ``g_l * out + (1 - g_l) * in`` with ``g_l = sigmoid(gamma_l)`` (eq. 6-7).
    Gate priors start at ``gamma_l = -gate_init`` (official code). ``hard`` gates (Table 4 ablation) are a
    straight-through Gumbel-sigmoid: in training ``s = sigmoid(gamma + log u - log(1 - u))``, u ~ U(0, 1) drawn
    per image and gate, forward value ``1[s > 0.5]``, gradient of ``s``; in evaluation ``1[gamma > 0]``.
- prompt location (VPT Fig. 5, §4.3) ``prepend`` / ``add`` / ``add-1`` / ``prepend-pixel`` / ``concat-channel`` /
  ``pad``, each a unit in ``vptool.prompting.locations`` (its tensors, how it changes the embedded tokens, which
  modes it takes); ``prepend`` is the modes' own rows above.
- learnable attention temperature (GateVPT eq. 9): tau_l per block, init 1, logits divided by tau_l for every
  token and head; kept in ``[temperature_min, temperature_max]`` (official code: [0.01, 10]) by clamping in the
  forward and projecting the parameter after each optimizer step (``constrain_``), like the official in-place clamp.
  On BEiT the relative position bias is part of the logit and is divided too.
- extra tokens: a [MASK] token (VPTM §4.1, eq. 6): the backbone's pretrained ``mask_token`` (BEiT v2), or a
  learnable one (init truncated normal, std 0.02, as BEiT initialises its own) for backbones without one.
- token order: a string over ``C`` (prefix/CLS tokens), ``X`` (patch tokens), ``P`` (prompt rows), ``M`` ([MASK]),
  ``C`` first. Default ``CPX`` (VPT eq. 4) or ``CXPM`` with a mask token (VPTM eq. 6); VPTM Table 5 also uses
  ``CXMP``, ``CPMX``, ``CMPX``.
- readout pool ``cls`` / ``avg`` (patch tokens) / ``avg_all`` (every token after the prefix tokens: prompts,
  [MASK] and patches) / ``mask`` (the [MASK] row, VPTM h[MASK]); norm ``pretrained`` / ``fresh`` / ``none``.
- head ``linear`` / ``verbalizer`` / ``mlp1`` / ``mlp2`` (``heads.py``).

Positions: prompts and [MASK] get no position embedding. On BEiT the (shared and/or per-block) relative position
bias covers CLS and patches exactly as in pretraining; every pair involving a prompt or [MASK] token gets zero
bias. Attention is then permutation-equivariant over the rows, so the four VPTM orders give the same logits up
to float rounding (``tests/test_methods.py`` checks it). VPTM Table 5 reports different accuracies per order;
those are separately trained runs, and the paper does not describe a position signal for the extra tokens.

Shapes: B images, N patch tokens, Np prompts per set, D width, K classes, L blocks, H heads.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.utils.checkpoint

from vptool.config import ModelConfig, choice_fields, field_names
from vptool.errors import UserError
from vptool.prompting.adapter_state import AdapterState, check_finite
from vptool.prompting.face import TimmFace, backbone_data_config, format_parameter_summary
from vptool.prompting.families import family_for
from vptool.prompting.heads import build_head
from vptool.prompting.init import init_prompts, load_prompt_file
from vptool.prompting.layout import RowLayout, default_order, order_problem
from vptool.prompting.locations import location_for
from vptool.prompting.lowp import DTYPES, store_frozen, upcast
from vptool.prompting.modes import BlockStep, PromptTokens, mode_for
from vptool.prompting.modes.gated import PromptGates

__all__ = ["CHOICE_OPTIONS", "ModelConfig", "PromptGates", "PromptTokens", "PromptedCore", "check_finite",
           "format_parameter_summary"]

#: the constructor options that are choices, and their tables (``ModelConfig``'s; shared with the recipe schema).
CHOICE_OPTIONS = choice_fields()

#: the order of the keyword arguments before ``ModelConfig`` (``PromptedViT(backbone, K, "deep", 10, ...)``).
POSITIONAL_OPTIONS = ("prompt_mode", "prompt_length", "prompt_init", "prompt_file", "prompt_values", "prompt_dropout",
                      "prompt_trainable", "readout_pool", "readout_norm", "tune", "deep_form", "generator")


class PromptedCore(AdapterState, TimmFace, nn.Module):
    """The prompted model without its library face (``vptool.prompting.model.PromptedViT`` adds ``predict``,
    ``save_pretrained``, ``from_pretrained``): a frozen timm ViT/BEiT with prompts, optional [MASK] token,
    temperature, a readout and a head. A family that owns its forward (Swin: prompts inside every window, VPT
    §4.2) gets its prompts, forward and readout from its ops (``Family.owns_forward``); D is then the width the
    head reads (Swin's last stage) and L the blocks over every stage.

    Args:
        backbone: frozen timm ``VisionTransformer`` or ``Beit`` (see ``vptool.backbones.build_backbone``), or a
            timm ``SwinTransformer``, ``ConvNeXt`` or ``ResNet``, whose family owns the forward
            (``Family.owns_forward``: prompts in every window, VPT Table 2; pad prompts, Table 5).
        config: the options (``vptool.config.ModelConfig``: prompt mode and length, readout, head, tune, ...,
            each documented there), with ``num_classes`` K. The keyword form is the same options as keywords:
            ``PromptedViT(backbone, K, "deep", 10, readout_pool="avg")`` equals
            ``PromptedViT(backbone, ModelConfig(num_classes=K, prompt_mode="deep", prompt_length=10,
            readout_pool="avg"))``.
        generator: RNG for the prompt, head and [MASK] init.
        prompt_values: the initial prompts themselves, (Np, D) or (L, Np, D); wins over ``prompt_init`` (an SPT
            strategy needs them: ``vptool.engine.init_prompts``).
        pretrained_mask_token: the backbone's pretrained [MASK] embedding (1, 1, D) or (1, D), if any.

    Attributes:
        config: the validated ``ModelConfig`` (token order resolved) that rebuilds this model.
        options: ``config.to_dict()``, ``adapter_config.json``'s "model" section.
        mode: the prompt mode's unit (``vptool.prompting.modes``).
        class_names: the K class names (index = label), or None; set by vptool's builders (``vptool.load``,
            ``from_preset``, training).
        eval_transform: ``vtab`` or ``fgvc``: the evaluation transform ``predict`` applies (``set_data_config``).
        data_config: input size, mean and std in timm's form (also ``pretrained_cfg``, so
            ``timm.data.resolve_model_data_config(model)`` gives them).
        activation_checkpointing: recompute each block in the backward pass (``ModelConfig``; may be set at any
            time). Training with grad only; Swin and the ConvNets refuse it.
        backbone_low_dtype: the frozen backbone weights' storage dtype (``store_backbone``), None for fp32.
        backbone_config: how to rebuild the backbone (name, kwargs, checkpoint, sha256, seed), or None for a
            backbone vptool did not build.
        adapter_info: provenance for ``save_pretrained``'s model card (method, dataset, metrics, recipe).

    Input Shape:
        (B, 3, H, W) images normalised with the backbone's data config.
    Output Shape:
        (B, K) logits.

    Raises:
        ValueError: an option outside its allowed values (``vptool.options``; the message names them all).
        UserError: a backbone family without an ops file (``vptool.prompting.families``), or an option the
            backbone cannot support (``cls`` readout without a class token, a pretrained [MASK] token the backbone
            does not have, an invalid token order).
    """

    def __init__(self, backbone: nn.Module, config: ModelConfig | int | None = None, *args,
                 generator: torch.Generator | None = None, prompt_values: torch.Tensor | None = None,
                 pretrained_mask_token: torch.Tensor | None = None, **options):
        super().__init__()
        config = _as_config(config, args, options)
        generator = options.pop("generator", generator)
        prompt_values = options.pop("prompt_values", prompt_values)
        c = config.validate()
        if c.num_classes is None:
            raise ValueError("num_classes: missing; give K, the number of classes (ModelConfig(num_classes=K))")
        if c.readout_pool == "cls" and getattr(backbone, "cls_token", None) is None:
            raise UserError("readout.pool: 'cls' needs a backbone with a class token; use avg")
        self.backbone = backbone
        self.family = family_for(backbone)  # the backbone family's ops: embedding, block forward, position bias
        # the prompt mode's unit: shapes, names, how it runs each block; prompt.length 0 is no prompt tokens (VPTM
        # Fig. 7's verbalizer-only point), whatever the mode
        self.mode = mode_for(c.prompt_mode if c.prompt_length > 0 else "none")
        self.location = location_for(c.prompt_location)  # where the prompts enter (VPT Fig. 5): tensors, embedding
        self.prompt_mode = c.prompt_mode
        self.readout_pool = c.readout_pool
        self.readout_norm = c.readout_norm
        self.tune = c.tune
        self.deep_form = c.deep_form
        # D the head's width, L the blocks (a hierarchical family: over every stage; Family.sizes)
        D, L, self.num_prefix_tokens = self.family.sizes(backbone)
        self.num_features = D
        self._refuse_what_cannot_run(c)
        # block index -> its prompt set (prompt.blocks, VPT Fig. 7): every block for deep, block 0 for shallow
        self.prompt_set_at = {b: j for j, b in enumerate(self.mode.sets(L, c.prompt_blocks))}
        self.prompts = self._build_prompts(c, prompt_values, generator)
        self.gates = None
        for name, module in self.mode.extras(L, c).items():  # e.g. GateVPT's gates
            setattr(self, name, module)
        # temperature (GateVPT eq. 9)
        self.temperature_range = tuple(c.temperature_range)
        self.temperature = nn.Parameter(torch.ones(L)) if c.temperature == "learnable" else None
        self._build_mask_token(c.mask_token, pretrained_mask_token, generator)
        if c.readout_pool == "mask" and self.mask_source is None:
            raise UserError("readout.pool: 'mask' needs a [MASK] token; set tokens.mask: auto")
        order = c.token_order
        if order is not None and c.prompt_length == 0:  # no prompt tokens: a preset's order keeps the rest
            order = order.replace("P", "")
        self.order = self._check_order(order)
        # readout and head
        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if c.readout_norm == "fresh" else None
        self.head_name, head_module = build_head(c.head, D, c.num_classes, c.head_dim, generator, init=c.head_init)
        setattr(self, self.head_name, head_module)
        self._set_trainable(c.tune, c.prompt_trainable)
        #: recompute each block in the backward pass (training with grad only); a runtime setting, may be changed
        self.activation_checkpointing = c.activation_checkpointing
        self.backbone_low_dtype: torch.dtype | None = None  # the frozen weights' storage dtype when not fp32
        self.store_backbone(c.backbone_dtype)
        self.config = c.replace(token_order=self.order)  # what rebuilds this model (adapter_config.json "model")
        self.num_classes = c.num_classes
        self.class_names: list[str] | None = None  # K names, index = label (set by vptool's builders)
        self.eval_transform = "vtab"  # the protocol whose evaluation transform predict() uses (data.train_transform)
        self.backbone_config: dict | None = None  # how to rebuild the backbone (set by vptool's builders)
        self.adapter_info: dict = {}  # provenance for the model card: method, dataset, metrics, recipe
        self.loaded_from = None  # the folder vptool.load read this model from (save_pretrained never writes there)
        self._data_config = backbone_data_config(backbone)

    def _refuse_what_cannot_run(self, c: ModelConfig) -> None:
        """Raise on options this mode, location and backbone family cannot run together (one line each)."""
        least = mode_for(c.prompt_mode).min_length
        if c.prompt_length < least:
            raise ValueError(f"prompt_length={c.prompt_length} must be >= {least} for prompt_mode {c.prompt_mode!r}")
        if self.family.owns_forward:  # a family with its own prompted forward refuses what it cannot run (Swin)
            self.family.check_config(self.backbone, c)
        else:
            problem = self.location.problem(c, self.family.name)
            if problem:
                raise UserError(problem)
        if c.activation_checkpointing and self.family.owns_forward:
            raise UserError(f"train.activation_checkpointing: the {self.family.name} family runs its own forward, "
                            "which vptool does not checkpoint; use off (or auto)")
        if c.readout_pool == "prompt" and not self.mode.has_prompts:
            raise UserError("readout.pool: 'prompt' pools the prompt tokens; prompt.mode none has none; use cls or "
                            "avg")

    @property
    def options(self) -> dict:
        """``config.to_dict()``: the options that rebuild this model (``adapter_config.json`` "model")."""
        return self.config.to_dict()

    @property
    def prompt_rows(self) -> bool:
        """Whether the prompts are rows of every block's input (the mode's ``rows``, at a location with rows)."""
        return self.mode.rows and self.location.rows

    def _build_prompts(self, c: ModelConfig, values: torch.Tensor | None,
                       generator: torch.Generator | None) -> nn.Module | None:
        """The prompt tokens, shaped by the mode (``mode.shape``: (Np, D) or (L, Np, D)), from ``values``, a file or
        an init rule; the location's tensors where it has its own (``vptool.prompting.locations``); None for a mode
        without prompts."""
        mode = self.mode
        if not mode.has_prompts:
            return None
        if self.family.owns_forward:  # e.g. Swin: a width per stage (Family.build_prompts)
            return self.family.build_prompts(self, c, values, generator)
        own = self.location.build(self, c, generator)
        if own is not None:
            if values is not None:
                raise UserError(f"prompt.init: given prompt values fit prompt.location prepend, not "
                                f"{c.prompt_location!r}; use prompt.init xavier or zeros")
            return own
        bb = self.backbone
        D, L = bb.embed_dim, len(bb.blocks)
        shape = mode.shape(L, c.prompt_length, D, c.prompt_blocks)
        name = mode.tensor_name
        if values is not None:
            if tuple(values.shape) != shape:
                raise UserError(f"prompt.init: {name} has shape {tuple(values.shape)}, the model needs "
                                f"{shape}; match prompt.length and the backbone")
            init = values.detach().float().cpu().clone()
        elif c.prompt_init == "file":
            if not c.prompt_file:
                raise UserError("prompt.init_file: missing; prompt.init 'file' needs an init-prompts output")
            init = load_prompt_file(c.prompt_file, name, shape)
        elif c.prompt_init not in ("xavier", "zeros"):
            raise ValueError(f"prompt_init {c.prompt_init!r} needs prompt_values (vptool.engine.init_prompts)")
        else:
            init = init_prompts(shape, c.prompt_init, tuple(bb.patch_embed.patch_size), D, generator)
        return PromptTokens(mode.tensor, init, c.prompt_dropout)

    def _build_mask_token(self, mode: str, pretrained: torch.Tensor | None,
                          generator: torch.Generator | None) -> None:
        """The [MASK] token (VPTM eq. 6): a buffer holding the pretrained one, a learnable (1, D), or None."""
        self.mask_source: str | None = None
        self.mask_token: torch.Tensor | None
        if mode == "none":
            self.mask_token = None
            return
        D = self.backbone.embed_dim
        have = pretrained is not None
        if mode == "pretrained" and not have:
            raise UserError("tokens.mask: 'pretrained' but this backbone has no pretrained [MASK] embedding "
                            "(a BEiT v1/v2 pretraining checkpoint has one); use auto or learnable")
        if mode in ("pretrained", "auto") and have:
            self.register_buffer("mask_token", pretrained.detach().float().reshape(1, D).clone(), persistent=False)
            self.mask_source = "pretrained"
        else:
            t = torch.empty(1, D)
            nn.init.trunc_normal_(t, std=0.02, generator=generator)
            self.mask_token = nn.Parameter(t)
            self.mask_source = "learned"

    def _set_trainable(self, tune: str, prompt_trainable: bool) -> None:
        """The trainable set, explicit: the backbone (and a fresh readout norm) only when ``tune == "all"``."""
        self.backbone.requires_grad_(tune == "all")
        if self.fc_norm is not None:
            self.fc_norm.requires_grad_(tune == "all")
        adapt = tune in ("prompts", "all")
        if self.prompts is not None:
            self.prompts.requires_grad_(prompt_trainable and adapt)
        for p in (self.gates, self.temperature):
            if p is not None:
                p.requires_grad_(adapt)
        if isinstance(self.mask_token, nn.Parameter):
            self.mask_token.requires_grad_(adapt)
        self.backbone.eval()

    def store_backbone(self, dtype: str | torch.dtype) -> None:
        """Store the frozen backbone weights in ``dtype`` (``fp32``, ``bf16``, ``fp16`` or a torch dtype) from now
        on; trainable tensors stay fp32 (``vptool.prompting.lowp``: how the forward computes with them).

        Raises:
            UserError: a low-precision dtype while the backbone trains (``tune: all``).
        """
        names = {v: k for k, v in DTYPES.items()}
        name = names[dtype] if isinstance(dtype, torch.dtype) else dtype
        if name != "fp32" and self.tune == "all":
            raise UserError(f"backbone.dtype: {name} stores the frozen backbone in low precision but train.tune all "
                            "trains it; use backbone.dtype fp32 (or auto)")
        store_frozen(self.backbone, DTYPES[name])
        self.backbone_low_dtype = None if name == "fp32" else DTYPES[name]
        if hasattr(self, "config"):
            self.config = self.config.replace(backbone_dtype=name)

    def computing(self, part: nn.Module | None = None, saved_low: bool = True):
        """Context in which ``part`` of the backbone (default: all of it but its blocks) computes with its stored
        low-precision weights upcast (``vptool.prompting.lowp.upcast``; ``saved_low``: autograd saves the stored
        weights, not the copies); a no-op for fp32 weights."""
        if part is not None:
            return upcast(part, self.backbone_low_dtype, saved_low=saved_low)
        blocks = getattr(self.backbone, "blocks", None)
        skip = (blocks,) if isinstance(blocks, nn.Module) and not self.family.owns_forward else ()
        return upcast(self.backbone, self.backbone_low_dtype, skip)

    def _check_order(self, order: str | None) -> str:
        has_prompts, has_mask = self.prompts is not None and self.location.rows, self.mask_source is not None
        order = default_order(has_prompts, has_mask) if order is None else order
        problem = order_problem(order, has_prompts, has_mask)
        if problem:
            raise UserError(problem)
        return order

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> PromptedCore:
        """Train mode for prompts/head only: the backbone always stays in eval mode (no drop-path/dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    def get_classifier(self) -> nn.Module:
        """The classification head module (registered as ``head`` or ``verbalizer``)."""
        return getattr(self, self.head_name)

    @torch.no_grad()
    def constrain_(self) -> None:
        """Project constrained parameters back into range after an optimizer step (temperature clamp)."""
        if self.temperature is not None:
            self.temperature.clamp_(*self.temperature_range)

    # ------------------------------------------------------------------------------------------- layout
    def _lengths(self, N: int) -> dict[str, int]:
        return {"C": self.num_prefix_tokens, "X": N, "P": self.prompts.length if self.prompts else 0, "M": 1}

    def row_order(self, with_prompts: bool | None = None) -> str:
        """The order of the rows present in a block's input (P only when prompts are rows)."""
        keep = self.mode.rows if with_prompts is None else with_prompts
        return self.order if keep else self.order.replace("P", "")

    def layout(self, order: str, N: int, prefix: int = 0) -> RowLayout:
        """The ``RowLayout`` of rows in ``order`` with N patch tokens and ``prefix`` prefix prompts."""
        return RowLayout(order, self._lengths(N), prefix)

    def slices(self, order: str, N: int) -> dict[str, slice]:
        """Row slices of each letter of ``order`` for N patch tokens."""
        return self.layout(order, N).slices()

    def assemble(self, parts: dict[str, torch.Tensor], order: str) -> torch.Tensor:
        """Concatenate (B, n, D) row groups by letter in ``order`` -> (B, T, D)."""
        return torch.cat([parts[ch] for ch in order], dim=1)

    def split(self, x: torch.Tensor, order: str, N: int) -> dict[str, torch.Tensor]:
        """(B, T, D) rows in ``order`` -> their row groups by letter."""
        return {ch: x[:, sl] for ch, sl in self.slices(order, N).items()}

    # ------------------------------------------------------------------------------------------- forward
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding + prefix tokens (the family's ``embed``, through the prompt
        location's pixels where it has some: ``concat-channel``, ``pad``): (B, 3, H, W) -> (B, n_prefix + N, D)."""
        with self.computing():  # weights stored in bf16 (backbone.dtype) are upcast around it
            return self.location.embed(self, x)

    def temperatures(self) -> torch.Tensor | None:
        """tau (L,) clamped to the allowed range, or None when the temperature is fixed."""
        if self.temperature is None:
            return None
        return self.temperature.clamp(*self.temperature_range)

    def run_block(self, step: BlockStep, blk: nn.Module, h: torch.Tensor, order: str,
                  prefix: torch.Tensor | None = None) -> torch.Tensor:
        """Block ``blk`` (the ``i``-th, as ``step`` counts) on rows ``h`` (B, T, D) in ``order`` through the
        family's ops, with this forward's temperature and ``prefix`` (1 or B, Np, D) prompt keys/values."""
        i = step.state["i"]
        tau = None if step.taus is None else step.taus[i]
        layout = self.layout(order, step.N, 0 if prefix is None else prefix.shape[1])
        return self.family.block(blk, h, layout, prefix, tau, step.state)

    def _blocks(self, x: torch.Tensor, last: int | None = None):
        """Run the blocks; yield ``(i, tokens after block i (B, T, D), their row order, N)`` for i = 0..last.

        Each block is the prompt location's (``LocationUnit.block``: the prompt mode's ``PromptModeUnit.block``,
        or ``add``'s sets added to the rows). After a gated block the prompt rows are already
        the gated mix (GateVPT eq. 7), i.e. the rows entering block i + 1.

        Raises:
            UserError: a family that owns its forward (Swin) has no token sequence per block (``forward_intermediates``
                reads this).
        """
        if self.family.owns_forward:
            raise UserError(f"forward_intermediates: the {self.family.name} family has no token sequence per block; "
                            "use a ViT or BEiT backbone")
        blocks = self.backbone.blocks
        last = len(blocks) - 1 if last is None else last
        tok = self.embed(x)
        B = tok.shape[0]
        N = tok.shape[1] - self.num_prefix_tokens
        parts = {"C": tok[:, :self.num_prefix_tokens], "X": tok[:, self.num_prefix_tokens:]}
        if self.mask_source is not None:
            parts["M"] = self.mask_token.to(tok.dtype).unsqueeze(0).expand(B, -1, -1)
        if self.prompt_rows:
            parts["P"] = self.prompts.set(None, B).to(tok.dtype).expand(B, -1, -1)
        order = self.row_order()
        h = self.assemble(parts, order)
        with self.computing():
            start = self.family.start(self.backbone)
        step = BlockStep(B, N, self.temperatures(), self.mode.begin(self, B), start)
        recompute = self.activation_checkpointing and self.training and torch.is_grad_enabled()
        for i, blk in enumerate(blocks[:last + 1]):
            if recompute:  # the block's activations are recomputed in backward, the prompt dropout masks too
                h, order = torch.utils.checkpoint.checkpoint(self._block, step, i, blk, h, order, False,
                                                             use_reentrant=False, preserve_rng_state=True)
            else:
                h, order = self._block(step, i, blk, h, order)
            yield i, h, order, N

    def _block(self, step: BlockStep, i: int, blk: nn.Module, h: torch.Tensor, order: str, saved_low: bool = True):
        """Block i: the prompt location's (``LocationUnit.block``: the prompt mode's ``PromptModeUnit.block``, or
        ``add``'s sets added to the rows), with its weights upcast where stored in low precision. Everything it
        reads is set here, so activation checkpointing can run it again in the backward pass (which saves nothing
        inside the block: ``saved_low`` False)."""
        step.state["i"] = i
        with self.computing(blk, saved_low):
            return self.location.block(self, step, i, blk, h, order)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, before any norm.

        Input Shape:
            (B, 3, H, W)
        Output Shape:
            (B, T, D), rows in ``self.output_order`` (``self.slices`` gives each letter's rows): prefix tokens,
            patch tokens, prompt rows (shallow/gated, or deep with ``avg_all``) and the [MASK] row. A family that
            owns its forward (Swin, ConvNets) returns its own rows or feature map (``Family.forward_features``).
        """
        if self.family.owns_forward:
            with self.computing():
                return self.family.forward_features(self, x)
        out = None
        for _, h, _, _ in self._blocks(x):
            out = h
        return out

    @property
    def output_order(self) -> str:
        """Row order of ``forward_features``'s output."""
        return self.row_order(with_prompts=self.mode.output_rows(self))

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Pool then norm: (B, T, D) tokens from ``forward_features`` -> (B, D) features for the head."""
        return self.norm_pooled(self.pool(x))

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """The readout's pooling (``readout.pool``): (B, T, D) tokens -> (B, D), before the readout norm."""
        if self.family.owns_forward:
            with self.computing():
                return self.family.pool(self, x)
        order = self.output_order
        n = self.num_prefix_tokens
        N = x.shape[1] - sum(self._lengths(0)[ch] for ch in order if ch != "X")
        sl = self.slices(order, N)
        if self.readout_pool == "cls":
            z = x[:, 0]
        elif self.readout_pool == "avg":
            z = x[:, sl["X"]].mean(dim=1)
        elif self.readout_pool == "prompt":  # VPT Fig. 8 Prompt-pool: the mean of the final prompt tokens
            z = x[:, sl["P"]].mean(dim=1)
        elif self.readout_pool == "mask":
            z = x[:, sl["M"].start]
        else:  # avg_all: every row after the prefix tokens
            z = x[:, n:].mean(dim=1)
        return z

    def norm_pooled(self, z: torch.Tensor) -> torch.Tensor:
        """The readout's norm (``readout.norm``) on pooled (B, D) features."""
        if self.family.owns_forward:
            with self.computing():
                return self.family.norm_pooled(self, z)
        if self.readout_norm == "pretrained":
            with self.computing():
                z = self.family.final_norm(self.backbone)(z)
        elif self.readout_norm == "fresh":
            z = self.fc_norm(z)
        return z

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) tokens -> (B, K) logits, or (B, D) features with ``pre_logits``."""
        z = self.readout(x)
        return z if pre_logits else self.get_classifier()(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, K) logits."""
        return self.forward_head(self.forward_features(x))

def _as_config(config, args: tuple, options: dict) -> ModelConfig:
    """The ``ModelConfig`` of a constructor call: ``config`` itself, or built from the keyword form (K first, then
    ``POSITIONAL_OPTIONS`` in order, then keywords). ``generator``/``prompt_values`` given positionally or as
    keywords are left in ``options`` for the constructor.

    Raises:
        TypeError: an unknown keyword, or options given twice.
    """
    if isinstance(config, ModelConfig):
        if args or set(options) - {"generator", "prompt_values"}:
            raise TypeError("PromptedViT: give the options in the ModelConfig or as keywords, not both")
        return config
    if len(args) > len(POSITIONAL_OPTIONS):
        raise TypeError(f"PromptedViT: at most {len(POSITIONAL_OPTIONS) + 2} positional arguments")
    for name, value in zip(POSITIONAL_OPTIONS, args):
        if name in options:
            raise TypeError(f"PromptedViT: {name} given twice")
        options[name] = value
    if "num_classes" in options and config is not None:
        raise TypeError("PromptedViT: num_classes given twice")
    names = set(field_names())
    unknown = sorted(set(options) - names - {"generator", "prompt_values"})
    if unknown:
        raise TypeError(f"PromptedViT: unexpected keyword argument {unknown[0]!r}")
    kw = {k: options.pop(k) for k in list(options) if k in names}
    if config is not None:
        kw["num_classes"] = config
    if "temperature_range" in kw:
        kw["temperature_range"] = tuple(float(v) for v in kw["temperature_range"])
    return ModelConfig(**kw)
