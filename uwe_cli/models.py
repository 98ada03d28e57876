"""Load a model for any task: torchvision registry names, user factories, pickled modules, TorchScript.

Extractors (classification, segmentation, detection) call `load_model` with their `task`, which picks
the torchvision sub-registry, so one loader handles checkpoints, wrappers and devices for all of them.
Every failure is a ModelError (or ResourceError for devices) with a one-line message naming the
culprit: the model name, the checkpoint file, the missing/unexpected keys.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import inspect
import io
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from uwe_cli import storage
from uwe_cli.errors import ModelError, ResourceError

TASK_MODULES = {
    "classification": "torchvision.models",
    "segmentation": "torchvision.models.segmentation",
    "detection": "torchvision.models.detection",
}
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net", "ema")
STRIP_PREFIXES = ("module.", "_orig_mod.")
MAX_KEYS_SHOWN = 6


@dataclass
class LoadedModel:
    """A ready-to-run model (eval mode, on its device) and what the pool metadata records about it."""

    module: Any  # torch.nn.Module or torch.jit.ScriptModule
    name: str
    checkpoint: str | Path | None = None
    checkpoint_sha256: str | None = None
    scripted: bool = False
    class_names: list[str] | None = None
    weights_transform: Any = None
    extra: dict[str, Any] = field(default_factory=dict)


def resolve_device(spec: str = "auto") -> Any:
    """`auto` → CUDA when present, else CPU; `cuda` without a GPU is a ResourceError, no fallback."""
    import torch

    spec = (spec or "auto").lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ResourceError(
                f"--device {spec} requested but no CUDA device is available; use --device cpu"
            )
        try:
            device = torch.device(spec)
        except RuntimeError:
            raise ResourceError(f"bad --device '{spec}' (use auto, cpu, cuda or cuda:N)") from None
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ResourceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) present")
        return device
    if spec == "cpu":
        return torch.device("cpu")
    raise ResourceError(f"bad --device '{spec}' (use auto, cpu, cuda or cuda:N)")


def available_models(task: str) -> list[str]:
    """torchvision's registry names for one task (classification excludes segmentation, video, …)."""
    import torchvision

    if task not in TASK_MODULES:
        raise ModelError(f"unknown task '{task}' (one of {', '.join(TASK_MODULES)})")
    module = importlib.import_module(TASK_MODULES[task])
    return sorted(torchvision.models.list_models(module=module))


def file_sha256(path: str | Path) -> str:
    """Checksum of a checkpoint file, recorded in the pool so a pool can be traced to its model."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def is_torchscript(path: Path) -> bool:
    """TorchScript archives are zip files with a `code/` folder; torch.save zips have none."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any("/code/" in name or name.startswith("code/") for name in zf.namelist())


TRUST_HINT = "pass --trust-checkpoint only if you trust where the file comes from"


def _unsafe_globals(path: Path, exc: BaseException) -> list[str]:
    """The Python classes/functions a checkpoint would import, named for the error message.

    Read without unpickling: torch's own scan for its zip format, `pickletools` (which only
    disassembles) for plain pickle files.
    """
    import pickletools
    import re

    import torch

    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(str(path)))
    except Exception:
        pass
    names: list[str] = []
    strings: list[str] = []
    try:
        with path.open("rb") as fh:
            for op, arg, _ in pickletools.genops(fh):
                if isinstance(arg, str):
                    strings.append(arg)
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:
        names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    return list(dict.fromkeys(names))


def _looks_like_a_checkpoint(path: Path) -> bool:
    """A zip archive (torch.save since 1.6) or a pickle stream (protocol 2+ starts with 0x80)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(4)
    except OSError as exc:
        raise ModelError(f"cannot read checkpoint {path}: {exc.strerror or exc}") from None
    return head.startswith(b"PK") or head[:1] == b"\x80"


def read_checkpoint(path: Path, trust: bool = False, shown: str | Path | None = None) -> Any:
    """The object in a checkpoint file: a state_dict (always the safe loader), or, with `trust`, a
    pickled module or TorchScript program.

    Without `trust` nothing in the file can run code: tensors, dicts, lists and numbers load through
    torch's weights-only unpickler, and anything else (a pickled nn.Module, an object with a
    `__reduce__`, a TorchScript program) is refused with a one-line error naming the flag. `shown` is
    the name used in messages (the URL a local copy came from).
    """
    import pickle

    import torch

    where = shown if shown is not None else path
    if path.is_dir():
        raise ModelError(f"checkpoint {where} is a directory; give the checkpoint file")
    if not path.is_file():
        raise ModelError(f"checkpoint not found: {where}")
    if not _looks_like_a_checkpoint(path):
        raise ModelError(f"checkpoint {where} is not a torch checkpoint (neither a zip nor a pickle file)")
    if is_torchscript(path):
        if not trust:
            raise ModelError(
                f"checkpoint {where} is a TorchScript program, which runs code from the file; {TRUST_HINT}"
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter(
                    "ignore", FutureWarning
                )  # "torch.jit is deprecated": not the user's error
                return torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:
            raise ModelError(f"cannot load TorchScript file {where}: {_first_line(exc)}") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "pickle protocol 4" notices on plain pickles
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not trust:
            names = _unsafe_globals(path, exc)
            what = f" ({', '.join(names[:3])})" if names else ""
            raise ModelError(
                f"checkpoint {where} holds Python objects beyond tensors{what}; unpickling them can run "
                f"code from the file: save a state_dict, or {TRUST_HINT}"
            ) from None
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {where}: {_first_line(exc)}") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise ModelError(
            f"checkpoint {where} holds a pickled object whose class cannot be imported ({_first_line(exc)}); "
            "make its module importable or save a state_dict"
        ) from None
    except Exception as exc:
        raise ModelError(f"cannot read checkpoint {where}: {_first_line(exc)}") from None


def unwrap_state_dict(obj: Any, path: Path | str = "checkpoint") -> dict[str, Any]:
    """A tensor dict from the usual wrappers ({'state_dict': …}, {'model_state_dict': …}, {'model': …}),
    with DataParallel/DDP `module.` and torch.compile `_orig_mod.` prefixes removed."""
    import torch

    for _ in range(4):
        if isinstance(obj, torch.nn.Module):
            obj = obj.state_dict()
            break
        if not isinstance(obj, Mapping):
            raise ModelError(f"{path}: expected a state_dict, found {type(obj).__name__}")
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        inner = next((obj[k] for k in WRAPPER_KEYS if k in obj), None)
        if inner is None:
            keys = ", ".join(map(str, list(obj)[:MAX_KEYS_SHOWN]))
            raise ModelError(
                f"{path}: no state_dict found (keys: {keys}); "
                f"expected tensors or one of {', '.join(WRAPPER_KEYS)}"
            )
        obj = inner
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ModelError(f"{path}: the state_dict holds no tensors")
    for prefix in STRIP_PREFIXES:
        while state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    return state


def load_state_dict_strict(module: Any, state: dict[str, Any], path: Path | str, name: str) -> None:
    """Load all weights or fail naming the missing, unexpected and mis-shaped keys."""
    own = module.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys: {_short_list(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {_short_list(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch (checkpoint vs model): {_short_list(mismatched)}")
        raise ModelError(f"checkpoint {path} does not fit model {name}: {'; '.join(parts)}")
    module.load_state_dict(state, strict=True)


def last_linear_name(module: Any) -> str | None:
    """Dotted name of the last nn.Linear in registration order (the classifier head of most models)."""
    import torch

    name = None
    for n, m in module.named_modules():
        if isinstance(m, torch.nn.Linear):
            name = n
    return name


def build_torchvision(name: str, task: str, num_classes: int | None, weights: str | None) -> tuple[Any, Any]:
    """(module, weights enum or None) for a registry name; weights come from the local hub cache only."""
    import torchvision

    names = available_models(task)
    if name not in names:
        close = [n for n in names if name.lower()[:4] in n][:5]
        hint = (
            f" (similar: {', '.join(close)})"
            if close
            else f" (see torchvision.models.list_models; {len(names)} known)"
        )
        raise ModelError(f"unknown {task} model '{name}'{hint}")
    kwargs: dict[str, Any] = {}
    weight_enum = None
    if weights:
        try:
            weight_enum = torchvision.models.get_weight(
                weights if "." in weights else f"{_weights_class(name)}.{weights}"
            )
        except (ValueError, KeyError, AttributeError):
            raise ModelError(
                f"unknown --weights '{weights}' for {name} (e.g. IMAGENET1K_V1 or DEFAULT)"
            ) from None
        kwargs["weights"] = weight_enum
        categories = weight_enum.meta.get("categories")
        if num_classes is not None and categories is not None and num_classes != len(categories):
            raise ModelError(
                f"--weights {weights} has {len(categories)} classes but --num-classes is {num_classes}; "
                "fine-tuned heads come from --checkpoint"
            )
    else:
        kwargs["weights"] = None
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        # Segmentation/detection builders default to downloading an ImageNet backbone; without --weights
        # the head is untrained anyway (a --checkpoint overwrites everything), so never download it.
        if "weights_backbone" in inspect.signature(torchvision.models.get_model_builder(name)).parameters:
            kwargs["weights_backbone"] = None
    try:
        # torch.hub announces downloads on stdout (machine output there) and its progress on stderr.
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            module = torchvision.models.get_model(name, **kwargs)
    except (OSError, RuntimeError) as exc:  # URLError is an OSError
        if weights:
            raise ModelError(
                f"cannot load --weights {weights} for {name}: not in the local cache and no network "
                f"({_first_line(exc)}); copy the file into $TORCH_HOME/hub/checkpoints or use --checkpoint"
            ) from None
        raise ModelError(f"cannot build model {name}: {_first_line(exc)}") from None
    except (TypeError, ValueError) as exc:
        raise ModelError(f"cannot build model {name}: {_first_line(exc)}") from None
    return module, weight_enum


def _weights_class(name: str) -> str:
    import torchvision

    builder = torchvision.models.get_model_builder(name)
    enum = torchvision.models.get_model_weights(builder)
    return enum.__name__


def build_factory(spec: str, num_classes: int | None) -> Any:
    """Call a user's `pkg.module:function`, passing `num_classes` if it takes that argument."""
    import torch

    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ModelError(f"cannot import '{module_name}' for --model {spec}: {_first_line(exc)}") from None
    factory = module
    for part in attr.split("."):
        factory = getattr(factory, part, None)
        if factory is None:
            raise ModelError(f"--model {spec}: '{module_name}' has no attribute '{attr}'")
    if not callable(factory):
        raise ModelError(f"--model {spec}: '{attr}' is not callable")
    kwargs: dict[str, Any] = {}
    if num_classes is not None:
        try:
            params = inspect.signature(factory).parameters
            if "num_classes" in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
                kwargs["num_classes"] = num_classes
        except (TypeError, ValueError):
            pass
    try:
        model = factory(**kwargs)
    except Exception as exc:
        raise ModelError(f"--model {spec} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, torch.nn.Module):
        raise ModelError(f"--model {spec} returned {type(model).__name__}, not a torch.nn.Module")
    return model


def _infer_num_classes(module: Any, state: dict[str, Any]) -> int | None:
    """Classes from the checkpoint's last Linear weight, so --num-classes may be left out."""
    head = last_linear_name(module)
    weight = state.get(f"{head}.weight") if head is not None else None
    return int(weight.shape[0]) if weight is not None and weight.ndim == 2 else None


def load_model(
    model: str | None,
    task: str = "classification",
    num_classes: int | None = None,
    checkpoint: str | Path | None = None,
    weights: str | None = None,
    device: Any = "cpu",
    trust_checkpoint: bool = False,
) -> LoadedModel:
    """One model in eval mode on `device`.

    - `model` a torchvision name for `task`, `timm:NAME`, `hf:DIR` or `pkg.module:factory`, plus an
      optional state_dict checkpoint (wrappers and prefixes handled; --num-classes inferred from it
      when omitted);
    - `model` None with a checkpoint holding a whole pickled nn.Module or a TorchScript file.
    """
    import torch

    from uwe_cli import model_sources

    if isinstance(device, str):
        device = resolve_device(device)
    if num_classes is not None and num_classes < 1:
        raise ModelError(f"--num-classes must be positive, got {num_classes}")
    if weights and model is not None and ":" in model and not model.startswith(model_sources.TIMM):
        raise ModelError(
            f"--weights applies to torchvision and timm models, not --model {model} (its weights come "
            "from its own code or --checkpoint)"
        )
    path = storage.as_location(checkpoint) if checkpoint is not None else None
    obj = sha = None
    if path is not None:
        with storage.local_copy(path) as local:
            obj = read_checkpoint(local, trust_checkpoint, shown=path)
            sha = file_sha256(local)
    scripted = isinstance(obj, torch.jit.ScriptModule)
    weight_enum = None
    class_names = transform = None

    whole = (
        obj["model"] if isinstance(obj, Mapping) and isinstance(obj.get("model"), torch.nn.Module) else obj
    )
    if scripted or isinstance(whole, torch.nn.Module):
        module = whole
        name = f"torchscript:{storage.name(path)}" if scripted else type(whole).__name__  # type: ignore[union-attr]
        if model is not None:
            raise ModelError(
                f"--checkpoint {path} holds a whole model ({name}), which runs as it is: drop --model {model}"
            )
    else:
        if model is None:
            raise ModelError(
                "--model is required unless --checkpoint holds a whole pickled nn.Module "
                "or a TorchScript file"
            )
        state = unwrap_state_dict(obj, path or "checkpoint") if obj is not None else None
        name = model
        if model.startswith(model_sources.HF):
            if state is not None:
                raise ModelError(
                    "--checkpoint is not used with --model hf:DIR (the directory holds the weights)"
                )
            module, class_names, processor = model_sources.build_hf(model[3:], task, trust_checkpoint)
            transform = model_sources.ProcessorTransform(processor)
        elif model.startswith(model_sources.TIMM):
            if state is not None and num_classes is None and not weights:
                num_classes = _infer_num_classes(model_sources.build_timm(model[5:], None, None)[0], state)
            module, transform = model_sources.build_timm(model[5:], num_classes, weights)
        elif ":" in model:
            module = build_factory(model, num_classes)
            if state is not None and num_classes is None:
                inferred = _infer_num_classes(module, state)
                if inferred is not None and inferred != _infer_num_classes(module, module.state_dict()):
                    module = build_factory(model, inferred)
        else:
            if state is not None and num_classes is None and not weights:
                probe, _ = build_torchvision(model, task, None, None)
                num_classes = _infer_num_classes(probe, state)
                del probe
            module, weight_enum = build_torchvision(model, task, num_classes, weights)
        if state is not None:
            load_state_dict_strict(module, state, path or "checkpoint", name)
    try:
        module = module.to(device).eval()
    except Exception as exc:
        raise ModelError(f"cannot move model {name} to {device}: {_first_line(exc)}") from None
    if weight_enum is not None:
        categories = weight_enum.meta.get("categories")
        class_names = list(categories) if categories else None
        transform = weight_enum.transforms()
    return LoadedModel(
        module=module,
        name=name,
        checkpoint=path,
        checkpoint_sha256=sha,
        scripted=scripted,
        class_names=class_names,
        weights_transform=transform,
    )


class ForwardTap:
    """Forward hooks recording what modules see, call after call: their input (default) or output.

    A head's input is the feature the paper uses; detectors call one head per level, so every call
    is kept (`values`) and `take()` returns the last one and starts afresh.
    """

    def __init__(self, modules: Any, use_input: bool = True, name: str = "") -> None:
        self.values: list[Any] = []
        self.use_input = use_input
        try:
            self._handles = [m.register_forward_hook(self._hook) for m in modules]
        except Exception as exc:  # TorchScript modules do not support hooks
            raise ModelError(
                f"cannot hook layer '{name}' ({type(modules[0]).__name__}): {_first_line(exc)}; "
                "save the model as a state_dict or a pickled module instead of TorchScript"
            ) from None

    def _hook(self, _module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        value = (inputs[0] if inputs else None) if self.use_input else output
        if isinstance(value, (tuple, list)):
            value = value[0]
        if isinstance(value, dict):
            value = next(iter(value.values()))
        self.values.append(value)

    def take(self) -> Any:
        value = self.values[-1] if self.values else None
        self.values = []
        return value

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


class TappedModel:
    """A loaded model and the tap on its feature layer (None: the model returns its features itself)."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.tap: ForwardTap | None = None

    def close(self) -> None:
        if self.tap is not None:
            self.tap.remove()


def find_module(module: Any, dotted: str) -> Any:
    """A submodule by dotted name (`layer4`, `classifier.1`), or ModelError listing a few valid names."""
    modules = dict(module.named_modules())
    if dotted not in modules:
        names = [n for n in modules if n][:12]
        raise ModelError(f"--feature-layer '{dotted}' not found; modules include: {', '.join(names)}, …")
    return modules[dotted]


def enable_dropout(module: Any) -> int:
    """Put only the dropout layers in train mode (MC dropout); returns how many were found."""
    import torch

    count = 0
    for m in module.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.train()
            count += 1
    return count


def _short_list(items: list[str]) -> str:
    shown = ", ".join(items[:MAX_KEYS_SHOWN])
    return shown + (f" (+{len(items) - MAX_KEYS_SHOWN} more)" if len(items) > MAX_KEYS_SHOWN else "")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
