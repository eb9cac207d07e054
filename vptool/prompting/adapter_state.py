"""The adapter of a prompted model: the tensors a run trains and saves, walked explicitly (``AdapterState``, a
mixin of ``vptool.prompting.core.PromptedCore``), and the NaN guard every saved file passes (``check_finite``).

Shapes: Np prompts per set, D width, K classes, L blocks, t verbalizer width.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from safetensors.torch import load_file

from vptool.errors import UserError


class AdapterState:
    """The adapter tensors of a ``PromptedCore``: its head, prompts, gates, temperature, learned [MASK] token,
    fresh readout norm and (full fine-tune) backbone, by the names of the adapter contract (DESIGN.md)."""

    def adapter_modules(self) -> dict[str, nn.Module | nn.Parameter]:
        """The modules and bare parameters whose tensors form the adapter (walked explicitly, not by name)."""
        mods: dict[str, nn.Module | nn.Parameter] = {self.head_name: self.get_classifier()}
        if self.prompts is not None:
            mods["prompts"] = self.prompts
        if self.gates is not None:
            mods["gates"] = self.gates
        if self.temperature is not None:
            mods["temperature"] = self.temperature
        if isinstance(self.mask_token, nn.Parameter):
            mods["mask_token"] = self.mask_token
        if self.fc_norm is not None:
            mods["fc_norm"] = self.fc_norm
        if self.tune == "all":
            mods["backbone"] = self.backbone
        return mods

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """A copy of the tensors the run saves (never the frozen backbone unless ``tune="all"``).

        Names follow the adapter contract: ``prompts.shallow`` (Np, D) or ``prompts.deep`` (L, Np, D) (another
        ``prompt.location`` has its own ``prompts.*``: ``vptool.prompting.locations``),
        ``gates.logit`` (L-1,), ``temperature`` (L,), ``mask_token`` (1, D) when learned, ``head.weight`` (K, D),
        ``head.bias`` (K,) (``head.fc1.*``/``head.fc2.*`` for mlp2), ``verbalizer.proj.weight`` (t, D),
        ``verbalizer.proj.bias`` (t,), ``verbalizer.prototypes`` (K, t), ``fc_norm.weight``/``fc_norm.bias`` (D,).
        On Swin deep prompts are one tensor per stage, ``prompts.deep.<s>`` (depth_s, Np, D_s) (``families.swin``).
        """
        out = {}
        for prefix, mod in self.adapter_modules().items():
            items = mod.state_dict().items() if isinstance(mod, nn.Module) else [("", mod)]
            for name, t in items:
                key = f"{prefix}.{name}" if name else prefix
                out[key] = t.detach().float().cpu().clone().contiguous()  # a snapshot, not a view
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
            if isinstance(mod, nn.Module):
                sub = {k[len(prefix) + 1:]: v for k, v in sd.items() if k.startswith(prefix + ".")}
                mod.load_state_dict(sub, strict=True)
            else:
                with torch.no_grad():
                    mod.copy_(sd[prefix])

    def save_adapter(self, path: str, metadata: dict[str, str] | None = None) -> None:
        """Write the adapter tensors to ``path`` atomically (safetensors, metadata ``format: pt``).

        Raises:
            RunError: a tensor holds NaN or inf (a diverged model is never saved).
        """
        from vptool.paths import write_safetensors

        sd = self.adapter_state_dict()
        check_finite(sd, path)
        write_safetensors(path, sd, {"format": "pt", **(metadata or {})})

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


def check_finite(tensors: dict[str, torch.Tensor], where: str) -> None:
    """Raises RunError naming the first tensor of ``tensors`` that holds NaN or inf (nothing is written)."""
    from vptool.errors import RunError

    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise RunError(f"{where}: not written: tensor {name} holds NaN or inf (the model diverged; lower train.lr)")
