"""Inference on new images: inputs, preprocessing, top-k rows, and the two runners ``vptool predict`` uses
(a PyTorch ``PromptedViT``, or an exported ``.onnx`` graph in onnxruntime alone).

Images go through the model's own evaluation transform: ``vptool.data.build_transforms`` on the model's
``data_config`` (input size (3, H, W), mean, std) and ``eval_transform`` (``vtab``: square resize; ``fgvc``:
resize to 256/224 of the size, centre crop). Files are read with PIL and converted to RGB
(``vptool.data.files.to_rgb``: grayscale, palette, RGBA, 16-bit).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from vptool.errors import UserError


# ------------------------------------------------------------------------------------------------ inputs
def image_extensions() -> tuple[str, ...]:
    """The file endings a folder is searched for (torchvision's ``IMG_EXTENSIONS``)."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    return tuple(IMG_EXTENSIONS)


def expand_inputs(inputs: list[str], stdin=None) -> list[Path]:
    """The image paths named by ``inputs``, in order: files as given, folders searched recursively for image
    files (sorted), and ``-`` for newline-separated paths read from ``stdin`` (blank lines skipped).

    Raises:
        UserError: a path that does not exist, a folder with no image file, or no image at all.
    """
    exts = image_extensions()
    out: list[Path] = []
    for item in inputs:
        if item == "-":
            stream = stdin if stdin is not None else sys.stdin
            for line in stream:
                line = line.strip()
                if line:
                    out.extend(expand_inputs([line]))
            continue
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in exts)
            if not found:
                raise UserError(f"{p}: folder holds no image file ({', '.join(exts)}); pass image files or "
                                "another folder")
            out.extend(found)
        elif p.is_file():
            out.append(p)
        else:
            raise UserError(f"{p}: no such file or folder; pass image files, folders, or - for paths on stdin")
    if not out:
        raise UserError("INPUT: no images given; pass image files, folders, or - and a list of paths on stdin")
    return out


def read_image(path: str | Path):
    """The image at ``path`` as a PIL RGB image (``vptool.data.files.checked_loader``).

    Raises:
        UserError: the file cannot be opened or decoded as an image (one line naming it).
    """
    from vptool.data.files import checked_loader

    return checked_loader(path)


# ------------------------------------------------------------------------------------------------ preprocessing
class Preprocess:
    """The evaluation transform of a model, for PIL images and for float tensors of pixel values in [0, 1].

    Args:
        data_config: ``input_size`` (3, H, W), ``mean``, ``std``.
        eval_transform: ``vtab`` or ``fgvc`` (``vptool.data.build_transforms``).
    """

    def __init__(self, data_config: dict, eval_transform: str):
        from vptool.data import build_transforms

        self.from_pil = build_transforms(data_config, eval_transform, from_pil=True)[1]
        self.from_tensor = build_transforms(data_config, eval_transform, from_pil=False)[1]

    def one(self, item) -> torch.Tensor:
        """(3, H, W) float32 from a path, a PIL image or a (3, h, w) tensor."""
        from PIL import Image

        if isinstance(item, (str, Path)):
            return self.from_pil(read_image(item))
        if isinstance(item, Image.Image):
            from vptool.data.files import to_rgb

            return self.from_pil(to_rgb(item))
        if isinstance(item, torch.Tensor):
            if item.dim() != 3 or item.shape[0] != 3:
                raise ValueError(f"images: a tensor image must be (3, H, W), got {tuple(item.shape)}")
            return self._tensor(item)
        raise ValueError(f"images: {type(item).__name__} is not a path, a PIL image or a tensor")

    def batch(self, items) -> torch.Tensor:
        """(B, 3, H, W) float32 from a (B, 3, h, w) tensor or a list of images (see ``one``)."""
        if isinstance(items, torch.Tensor) and items.dim() == 4:
            if items.shape[1] != 3:
                raise ValueError(f"images: a tensor batch must be (B, 3, H, W), got {tuple(items.shape)}")
            return self._tensor(items)
        return torch.stack([self.one(x) for x in items])

    def _tensor(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 pixels go the way a decoded file goes (resize on uint8, then to float: the same numbers as the
        file); float images in [0, 1] are resized as floats."""
        if x.dtype == torch.uint8:
            return self.from_pil(x)
        return self.from_tensor(x.float())


def _as_list(images) -> list:
    from PIL import Image

    if isinstance(images, (str, Path, Image.Image)):
        return [images]
    if isinstance(images, torch.Tensor):
        return [images] if images.dim() == 3 else list(images)
    return list(images)


# ------------------------------------------------------------------------------------------------ outputs
def top_k_rows(logits: torch.Tensor, classes: list[str], k: int) -> list[dict]:
    """``[{"classes": [...], "probs": [...]}]`` per row of (B, K) logits: the k most probable classes (k capped
    at K) with their softmax probabilities, most probable first."""
    probs = logits.float().softmax(dim=1)
    p, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [{"classes": [classes[j] for j in row_i.tolist()], "probs": [round(float(v), 6) for v in row_p.tolist()]}
            for row_p, row_i in zip(p, idx)]


def _check_counts(top_k: int, batch_size: int) -> None:
    if top_k < 1:
        raise ValueError(f"top_k={top_k} must be at least 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1")


def predict_images(model, images, top_k: int = 5, batch_size: int = 64) -> list[dict]:
    """``PromptedViT.predict``: see there."""
    _check_counts(top_k, batch_size)
    items = _as_list(images)
    prep = Preprocess(model.data_config, model.eval_transform)
    was_training = model.training
    run = TorchRunner(model)
    rows: list[dict] = []
    try:
        for s in range(0, len(items), batch_size):
            rows.extend(top_k_rows(run(prep.batch(items[s:s + batch_size])), run.classes, top_k))
    finally:
        model.train(was_training)
    return rows


# ------------------------------------------------------------------------------------------------ runners
class TorchRunner:
    """A ``PromptedViT`` as a batch function in eval mode: (B, 3, H, W) -> (B, K) float32 logits on CPU, with
    bf16 autocast on a CUDA device with bf16 and fp32 elsewhere (``precision: auto``)."""

    def __init__(self, model):
        self.model = model.eval()
        self.device = next(model.parameters()).device
        from vptool.engine.runtime import autocast_dtype

        self.amp_dtype = autocast_dtype("auto", self.device)
        self.classes = list(model.class_names or [str(k) for k in range(model.num_classes)])
        self.data_config = model.data_config
        self.eval_transform = model.eval_transform

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        from vptool.engine.runtime import autocast

        x = x.to(self.device, non_blocking=True)
        with autocast(self.device, self.amp_dtype):
            return self.model(x).float().cpu()


class OnnxRunner:
    """An exported ``.onnx`` graph in onnxruntime: no PyTorch model is built. Its class names and
    preprocessing come from the graph's metadata (``vptool.export.onnx_metadata``).

    Raises:
        UserError: onnxruntime is not installed, the file cannot be loaded, or it carries no vptool metadata.
    """

    def __init__(self, path: str | Path):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError('predict: reading an .onnx file needs onnxruntime: pip install "vptool[export]"') \
                from None
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise UserError(f"{path}: cannot load as an ONNX model ({str(exc).splitlines()[0]}); export it again "
                            "with vptool export --format onnx") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if "vptool" not in meta:
            raise UserError(f"{path}: carries no vptool metadata (class names, preprocessing); export it with "
                            "vptool export --format onnx")
        info = json.loads(meta["vptool"])
        self.classes = list(info["classes"])
        self.data_config = info["data_config"]
        self.eval_transform = info["eval_transform"]
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: x.float().contiguous().numpy()})[0]
        return torch.from_numpy(out)


def open_source(source: str | Path, device: str | None = None, backbone_checkpoint: str | Path | None = None):
    """The runner for ``vptool predict SOURCE``: an ``.onnx`` file (onnxruntime), or a run directory / adapter
    folder (``vptool.load``; bf16 autocast on a CUDA device with bf16, fp32 on CPU).

    Raises:
        UserError: see ``OnnxRunner`` and ``vptool.load``.
    """
    from vptool.adapter import load

    p = Path(source)
    if p.suffix == ".onnx":
        if not p.is_file():
            raise UserError(f"{p}: not found; pass an .onnx file from vptool export, a run directory or an "
                            "adapter folder")
        return OnnxRunner(p)
    return TorchRunner(load(p, device=device, backbone_checkpoint=backbone_checkpoint))
