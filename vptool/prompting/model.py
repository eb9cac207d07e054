"""The prompted forward: one frozen timm ViT, prompt tokens, a readout and a head.

Every method is a point in one option space (``docs: DESIGN.md §1``): prompt mode ``none`` / ``shallow`` /
``deep``, prompt init, readout pool and norm, and which tensors are tuned. Presets in ``vptool.recipe`` name the
points the papers use.

Token sequence entering block 1 (VPT, Jia et al. 2022, eq. 4): ``[CLS, P, E]``: prompts are inserted after the
position embedding, at ``backbone.num_prefix_tokens``, and get no position embedding.

- ``shallow`` (VPT eq. 4-5): one set P (Np, D) inserted once and carried through every block.
- ``deep`` (VPT eq. 7): L sets P (L, Np, D); set i enters block i+1 and the block's prompt outputs are dropped.
  Computed in the prefix form (``attention.prefix_block_forward``), which equals the concatenated form on every
  CLS/patch output. When the readout needs the last block's prompt outputs (``avg_all``), the last block runs in
  the concatenated form.

Shapes: B images, N patch tokens, Np prompts per set, D width, K classes, L blocks.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from vptool.errors import UserError
from vptool.prompting.attention import prefix_block_forward
from vptool.prompting.init import init_prompts, load_prompt_file


class PromptTokens(nn.Module):
    """Learnable prompt tokens: ``shallow`` (Np, D) or ``deep`` (L, Np, D), with prompt dropout.

    Prompt dropout (VPT code, deep default 0.1) is applied to a prompt set each time it is inserted, per image
    (B, Np, D masks), in train mode only.
    """

    def __init__(self, mode: str, init: torch.Tensor, dropout: float = 0.0):
        super().__init__()
        self.mode = mode
        self.length = init.shape[-2]  # Np
        setattr(self, mode, nn.Parameter(init))
        self.dropout = nn.Dropout(dropout)

    def set(self, i: int | None, B: int) -> torch.Tensor:
        """Prompt set to insert: (B, Np, D) in train mode with dropout, else (1, Np, D)."""
        p = (self.shallow if i is None else self.deep[i]).unsqueeze(0)
        if self.training and self.dropout.p > 0:
            p = self.dropout(p.expand(B, -1, -1))
        return p


class PromptedViT(nn.Module):
    """A frozen timm ViT with VPT prompts, a readout and a linear head.

    Args:
        backbone: frozen timm ``VisionTransformer`` (see ``vptool.backbones.build_backbone``).
        num_classes: K.
        prompt_mode: ``none``, ``shallow`` (VPT eq. 4-5) or ``deep`` (VPT eq. 7).
        prompt_length: Np.
        prompt_init: ``xavier`` (VPT), ``zeros`` (VPTM) or ``file``.
        prompt_file: init-prompts safetensors for ``prompt_init="file"``.
        prompt_dropout: dropout probability on each inserted prompt set.
        prompt_trainable: False freezes the prompts (head only; SPT Tab. 4a).
        readout_pool: ``cls``, ``avg`` (mean of patch tokens) or ``avg_all`` (mean of every token after the
            prefix tokens, prompts included).
        readout_norm: ``pretrained`` (backbone's final LayerNorm), ``fresh`` (new LayerNorm, weight 1, bias 0:
            MAE's fc_norm; trained only when ``tune="all"``) or ``none``. Applied after pooling.
        tune: ``prompts`` (prompts + head), ``head`` (linear probe) or ``all`` (full fine-tune).
        deep_form: ``prefix`` (default) or ``concat`` (reference form, for tests and benchmarks).
        generator: RNG for the prompt and head init.

    Input Shape:
        (B, 3, H, W) images normalised with the backbone's data config.
    Output Shape:
        (B, K) logits.

    Raises:
        UserError: an option the backbone cannot support (e.g. ``cls`` readout without a class token).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, prompt_mode: str = "none", prompt_length: int = 10,
                 prompt_init: str = "xavier", prompt_file: str | None = None, prompt_dropout: float = 0.0,
                 prompt_trainable: bool = True, readout_pool: str = "cls", readout_norm: str = "pretrained",
                 tune: str = "prompts", deep_form: str = "prefix", generator: torch.Generator | None = None):
        super().__init__()
        if prompt_mode not in ("none", "shallow", "deep"):
            raise ValueError(f"prompt_mode {prompt_mode!r}")
        if deep_form not in ("prefix", "concat"):
            raise ValueError(f"deep_form {deep_form!r}")
        if readout_pool == "cls" and getattr(backbone, "cls_token", None) is None:
            raise UserError("readout.pool: 'cls' needs a backbone with a class token; use avg")
        self.backbone = backbone
        self.prompt_mode = prompt_mode
        self.readout_pool = readout_pool
        self.readout_norm = readout_norm
        self.tune = tune
        self.deep_form = deep_form
        self.num_prefix_tokens = backbone.num_prefix_tokens
        D = backbone.embed_dim
        L = len(backbone.blocks)

        self.prompts: PromptTokens | None = None
        if prompt_mode != "none":
            shape = (prompt_length, D) if prompt_mode == "shallow" else (L, prompt_length, D)
            name = f"prompts.{prompt_mode}"
            if prompt_init == "file":
                if not prompt_file:
                    raise UserError("prompt.file: missing; prompt.init 'file' needs an init-prompts output")
                init = load_prompt_file(prompt_file, name, shape)
            else:
                init = init_prompts(shape, prompt_init, tuple(backbone.patch_embed.patch_size), D, generator)
            self.prompts = PromptTokens(prompt_mode, init, prompt_dropout)

        self.fc_norm = nn.LayerNorm(D, eps=1e-6) if readout_norm == "fresh" else None
        self.head = nn.Linear(D, num_classes)
        with torch.no_grad():
            nn.init.trunc_normal_(self.head.weight, std=0.02, generator=generator)
            self.head.bias.zero_()

        # The trainable set, explicit. The backbone is frozen unless tune == "all".
        self.backbone.requires_grad_(tune == "all")
        if self.fc_norm is not None:
            self.fc_norm.requires_grad_(tune == "all")
        if self.prompts is not None:
            self.prompts.requires_grad_(prompt_trainable and tune in ("prompts", "all"))
        self.backbone.eval()

    # ------------------------------------------------------------------------------------------- modes
    def train(self, mode: bool = True) -> PromptedViT:
        """Train mode for prompts/head only: the backbone always stays in eval mode (no drop-path/dropout)."""
        super().train(mode)
        self.backbone.eval()
        return self

    @property
    def num_prompt_rows(self) -> int:
        """Prompt rows present in ``forward_features``'s output (shallow always; deep only for avg_all)."""
        if self.prompts is None:
            return 0
        if self.prompt_mode == "shallow" or self.readout_pool == "avg_all":
            return self.prompts.length
        return 0

    # ------------------------------------------------------------------------------------------- forward
    def _insert(self, x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        n = self.num_prefix_tokens
        return torch.cat([x[:, :n], p.expand(x.shape[0], -1, -1).to(x.dtype), x[:, n:]], dim=1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding + position embedding + prefix tokens: (B, 3, H, W) -> (B, n_prefix + N, D)."""
        bb = self.backbone
        x = bb.patch_embed(x)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        return bb.norm_pre(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens after the last block, before any norm.

        Input Shape:
            (B, 3, H, W)
        Output Shape:
            (B, n_prefix + num_prompt_rows + N, D): prefix tokens, then prompt rows (shallow, or deep with
            ``avg_all``), then patch tokens.
        """
        x = self.embed(x)
        B = x.shape[0]
        mode = self.prompt_mode
        if mode == "shallow":
            x = self._insert(x, self.prompts.set(None, B))
        blocks = self.backbone.blocks
        for i, blk in enumerate(blocks):
            if mode != "deep":
                x = blk(x)
                continue
            p = self.prompts.set(i, B)
            keep_rows = i == len(blocks) - 1 and self.readout_pool == "avg_all"
            if self.deep_form == "prefix" and not keep_rows:
                x = prefix_block_forward(blk, x, p.to(x.dtype))
            else:
                y = blk(self._insert(x, p))
                n = self.num_prefix_tokens
                x = y if keep_rows else torch.cat([y[:, :n], y[:, n + self.prompts.length:]], dim=1)
        return x

    def readout(self, x: torch.Tensor) -> torch.Tensor:
        """Pool then norm: (B, T, D) tokens -> (B, D) features for the head."""
        n = self.num_prefix_tokens
        if self.readout_pool == "cls":
            z = x[:, 0]
        elif self.readout_pool == "avg":
            z = x[:, n + self.num_prompt_rows:].mean(dim=1)
        else:  # avg_all
            z = x[:, n:].mean(dim=1)
        if self.readout_norm == "pretrained":
            bb = self.backbone
            norm = bb.norm if not isinstance(bb.norm, nn.Identity) else bb.fc_norm
            z = norm(z)
        elif self.readout_norm == "fresh":
            z = self.fc_norm(z)
        return z

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(B, T, D) tokens -> (B, K) logits, or (B, D) features with ``pre_logits``."""
        z = self.readout(x)
        return z if pre_logits else self.head(z)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images -> (B, K) logits."""
        return self.forward_head(self.forward_features(x))

    # ------------------------------------------------------------------------------------------- adapter
    def adapter_modules(self) -> dict[str, nn.Module]:
        """The modules whose tensors form the adapter (walked explicitly, not matched by name)."""
        mods: dict[str, nn.Module] = {"head": self.head}
        if self.prompts is not None:
            mods["prompts"] = self.prompts
        if self.fc_norm is not None:
            mods["fc_norm"] = self.fc_norm
        if self.tune == "all":
            mods["backbone"] = self.backbone
        return mods

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the tensors the run saves: prompts, head, fc_norm (fresh), the backbone only when ``tune="all"``.

        Names follow the adapter contract: ``prompts.shallow`` (Np, D) or ``prompts.deep`` (L, Np, D),
        ``head.weight`` (K, D), ``head.bias`` (K,), ``fc_norm.weight``/``fc_norm.bias`` (D,).
        """
        out = {}
        for prefix, mod in self.adapter_modules().items():
            for name, t in mod.state_dict().items():
                out[f"{prefix}.{name}"] = t.detach().float().cpu().clone().contiguous()  # a snapshot, not a view
        return out

    def load_adapter_state_dict(self, sd: dict[str, torch.Tensor], source: str = "adapter") -> None:
        """Load tensors written by ``adapter_state_dict``; names and shapes must match exactly.

        Raises:
            UserError: missing, unexpected or mis-shaped tensors (named).
        """
        own = self.adapter_state_dict()
        missing = sorted(set(own) - set(sd))
        unexpected = sorted(set(sd) - set(own))
        shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or shapes:
            raise UserError(f"{source}: does not match the model built from the recipe "
                            f"(missing {missing[:3]}, unexpected {unexpected[:3]}, shape mismatch {shapes[:3]})")
        for prefix, mod in self.adapter_modules().items():
            sub = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
            mod.load_state_dict(sub, strict=True)

    def save_adapter(self, path: str, metadata: dict[str, str] | None = None) -> None:
        """Write the adapter tensors to ``path`` (safetensors, metadata ``format: pt``)."""
        save_file(self.adapter_state_dict(), path, metadata={"format": "pt", **(metadata or {})})

    def load_adapter(self, path: str) -> None:
        """Read an adapter written by ``save_adapter``.

        Raises:
            UserError: unreadable file or tensors that do not match this model.
        """
        try:
            sd = load_file(path)
        except Exception as exc:
            raise UserError(f"{path}: cannot read adapter ({exc})") from None
        self.load_adapter_state_dict(sd, source=path)

    # ------------------------------------------------------------------------------------------- summary
    def trainable_parameters(self) -> list[nn.Parameter]:
        """Parameters the optimizer updates (``requires_grad``), in a fixed order."""
        return [p for p in self.parameters() if p.requires_grad]

    def parameter_summary(self) -> tuple[int, int]:
        """(trainable, all) parameter counts; ``all`` counts backbone + prompts + fc_norm + head."""
        trainable = sum(p.numel() for p in self.trainable_parameters())
        total = sum(p.numel() for p in self.parameters())
        return trainable, total


def format_parameter_summary(trainable: int, total: int) -> str:
    """``trainable params: 1,234 || all params: 86,000,000 || trainable%: 0.0014`` (peft's format)."""
    return f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
