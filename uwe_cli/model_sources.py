"""Models from timm (`--model timm:NAME`) and Hugging Face transformers (`--model hf:PATH`).

Both are optional extras. Nothing is downloaded: timm pretrained weights (`--weights`) and
transformers repositories come from the local Hugging Face cache or a local directory only. The
model's own preprocessing is used unless options override it: timm's data config becomes the usual
resize / centre-crop / normalise split (per-image geometry, per-batch normalisation); a transformers
image processor runs as it is, so the tensors are exactly the ones the model was trained with.
Features are taken, as for torchvision, from the input of the classifier. Imported only when such
a model is asked for (it imports torch).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from uwe_cli.errors import ModelError

TIMM = "timm:"
HF = "hf:"


def _missing(extra: str, package: str) -> ModelError:
    return ModelError(f"--model {extra}:... needs {package}: pip install 'uwe-cli[{extra}]'")


@contextlib.contextmanager
def offline_hub() -> Iterator[None]:
    """Hugging Face Hub lookups answered from the local cache only (no network at run time)."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        import huggingface_hub.constants as hub

        saved, hub.HF_HUB_OFFLINE = hub.HF_HUB_OFFLINE, True
    except ImportError:  # pragma: no cover - comes with timm and transformers
        hub, saved = None, None
    try:
        yield
    finally:
        if hub is not None:
            hub.HF_HUB_OFFLINE = saved
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def build_timm(name: str, num_classes: int | None, weights: str | None) -> tuple[Any, Any]:
    """(module, timm's evaluation transform) for any `timm.list_models()` name.

    `weights` asks for timm's pretrained weights (a tag such as `DEFAULT`, or `name.tag`), from the
    local cache only; a `--checkpoint` state_dict is loaded by the caller.
    """
    try:
        import timm
        from timm.data import create_transform, resolve_data_config
    except ImportError:
        raise _missing("timm", "timm") from None
    if not timm.list_models(name) and name not in timm.list_pretrained(name):
        close = timm.list_models(f"*{name[:4]}*")[:5]
        raise ModelError(
            f"unknown timm model '{name}'" + (f" (similar: {', '.join(close)})" if close else "")
        )
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    model_name = name if not weights or weights == "DEFAULT" else f"{name}.{weights}"
    try:
        with offline_hub():
            module = timm.create_model(model_name, pretrained=bool(weights), **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        text = " ".join(str(exc).split())[:200]
        if weights:
            raise ModelError(
                f"cannot load timm weights for {model_name}: not in the local Hugging Face cache ({text}); "
                "use --checkpoint"
            ) from None
        raise ModelError(f"cannot build timm model {name}: {text}") from None
    config = resolve_data_config({}, model=module)
    return module, create_transform(**config)


class HFLogits(torch.nn.Module):
    """A transformers model called on pixel values, returning its logits as a plain tensor."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: Any) -> Any:
        return self.model(pixel_values=pixel_values).logits


class ProcessorTransform:
    """A transformers image processor as a per-image transform (PIL → normalised float CHW tensor)."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor

    def __call__(self, image: Any) -> Any:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]

    def __repr__(self) -> str:
        return f"ProcessorTransform({self.processor.to_json_string()})"


def build_hf(path: str, task: str, trust: bool) -> tuple[Any, list[str] | None, Any]:
    """(module returning logits, class names, image processor) from a local directory or cached repo.

    Remote code in the repository runs only with `trust` (--trust-checkpoint), as for pickles.
    """
    try:
        import transformers
    except ImportError:
        raise _missing("hf", "transformers") from None
    auto = {
        "classification": transformers.AutoModelForImageClassification,
        "segmentation": transformers.AutoModelForSemanticSegmentation,
    }.get(task)
    if auto is None:
        raise ModelError(f"--model hf:... is available for classification and segmentation, not {task}")
    if path.startswith(("/", ".", "~")) and not Path(path).expanduser().is_dir():
        raise ModelError(
            f"--model hf:{path}: no such directory (give a save_pretrained folder or a cached repo id)"
        )
    try:
        with offline_hub():
            model = auto.from_pretrained(path, local_files_only=True, trust_remote_code=trust)
            processor = transformers.AutoImageProcessor.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, KeyError) as exc:
        text = " ".join(str(exc).split())[:240]
        raise ModelError(f"cannot load --model hf:{path}: {text}") from None
    labels = getattr(model.config, "id2label", None) or {}
    names = [str(labels[i]) for i in sorted(labels)] if labels else None
    return HFLogits(model), names, processor
