"""Segmentation head of `uwe extract`: pixel uncertainty and features pooled per image or per region.

Paper Section 3.4, Eq. 6-7: a segmentation sample (an image or a patch) is scored by the *mean* pixel
uncertainty and described by the *mean* pixel feature, where the pixel feature is the input of the
final classifier. Everything below exists to compute exactly those two means cheaply:

* Pixel uncertainty is computed at logit resolution from the model's own output (softmax over K),
  pixel features at the resolution of the classifier's input (captured with a forward hook).
* A unit's box is given in pixels of the *original* image (that is what annotators see) and mapped
  onto each grid separately with ``floor(start * scale)`` / ``ceil(end * scale)`` (at least one
  cell), where ``scale = grid_size / image_size`` per axis. With torchvision models the logits are
  upsampled to the input size, so for native-size runs the uncertainty mean is over exactly the
  unit's pixels; features live on a stride-8/16 grid and cover the cells the box touches.
* All of this happens on the model's device and is reduced immediately to a few numbers per unit:
  no full-resolution probability map of a batch ever reaches host memory (only the single-channel
  heatmap, when asked for).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa

from uwe_cli import storage
from uwe_cli.data import IMAGENET_MEAN, IMAGENET_STD, ImageItem, check_mean_std
from uwe_cli.errors import DataError, ModelError
from uwe_cli.extract.runner import ExtractConfig, ExtractionResult, ExtractionTask, ProgressFn, run_extraction
from uwe_cli.models import ForwardTap, LoadedModel, TappedModel, load_model
from uwe_cli.outputs import file_name_for_id
from uwe_cli.schema import REGION_COLUMNS, UNCERTAINTY_MEASURES, record_batch, unit_schema

if TYPE_CHECKING:  # torch is imported lazily so that `uwe --help` stays fast
    import torch

MEASURES = UNCERTAINTY_MEASURES
# Rows of logits processed at once when turning logits into pixel uncertainty: bounds the transient
# K×rows×W probability tensor to about this many elements whatever the image size.
PIXEL_CHUNK_ELEMENTS = 1 << 23


# --------------------------------------------------------------------------------------------------
# Units: the regions (or whole images) that become pool rows
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionGrid:
    """A grid of regions: size (height, width) and stride (y, x). Stride defaults to the size."""

    height: int
    width: int
    stride_y: int
    stride_x: int


def _parse_pair(text: str, option: str) -> tuple[int, int]:
    """'512' -> (512, 512); '512x256' -> (height 512, width 256). Values must be positive integers."""
    value = str(text).strip().lower()
    match = re.fullmatch(r"(-?\d+)(?:\s*[x×,]\s*(-?\d+))?", value)
    if not match:
        raise DataError(f"{option} '{text}' is not a size: use N or HxW (e.g. 512 or 512x256), or none")
    h = int(match.group(1))
    w = int(match.group(2)) if match.group(2) is not None else h
    if h <= 0 or w <= 0:
        raise DataError(f"{option} must be positive, got '{text}'")
    return h, w


def parse_region_grid(region_size: str | None, region_stride: str | None = None) -> RegionGrid | None:
    """Parse `--region-size` / `--region-stride`. None or 'none' means one unit per image."""
    if region_size is None or str(region_size).strip().lower() in ("", "none", "image"):
        if region_stride not in (None, "", "none"):
            raise DataError("--region-stride needs --region-size")
        return None
    h, w = _parse_pair(region_size, "--region-size")
    if region_stride in (None, "", "none"):
        sy, sx = h, w
    else:
        sy, sx = _parse_pair(region_stride, "--region-stride")
    return RegionGrid(h, w, sy, sx)


def _starts(length: int, size: int, stride: int) -> list[int]:
    """Region starts along one axis: 0, stride, 2·stride, … until a region reaches the border.

    With stride == size this is the plain grid; with overlapping regions (stride < size) it stops as
    soon as a region touches the border, so no clipped region lies entirely inside its neighbour.
    """
    starts = [0]
    while starts[-1] + size < length and starts[-1] + stride < length:
        starts.append(starts[-1] + stride)
    return starts


def unit_boxes(width: int, height: int, grid: RegionGrid | None) -> list[tuple[int, int, int, int]]:
    """Boxes (x, y, w, h) in image pixels, row-major (top to bottom, left to right); borders clipped."""
    if grid is None:
        return [(0, 0, width, height)]
    boxes = []
    for y in _starts(height, grid.height, grid.stride_y):
        for x in _starts(width, grid.width, grid.stride_x):
            boxes.append((x, y, min(grid.width, width - x), min(grid.height, height - y)))
    return boxes


def region_id(image_id: str, box: tuple[int, int, int, int]) -> str:
    """The readable region ID annotators receive: ``<image_id>@<x>,<y>,<width>x<height>``."""
    x, y, w, h = box
    return f"{image_id}@{x},{y},{w}x{h}"


def map_span(start: int, end: int, size: int, cells: int) -> tuple[int, int]:
    """Map the pixel span [start, end) of an axis of `size` pixels onto a grid of `cells` cells.

    Rule: ``floor(start * cells / size)`` to ``ceil(end * cells / size)``, clamped to the grid and
    at least one cell wide. Integer arithmetic, so the rule is exact (no float rounding surprises).
    """
    c0 = (start * cells) // size
    c1 = -((-end * cells) // size)
    c0 = min(max(c0, 0), cells - 1)
    c1 = min(max(c1, c0 + 1), cells)
    return c0, c1


def map_boxes(
    boxes: Sequence[tuple[int, int, int, int]], image_hw: tuple[int, int], grid_hw: tuple[int, int]
) -> np.ndarray:
    """Boxes (x, y, w, h) in image pixels -> int64 array of (y0, y1, x0, x1) cell spans on a grid."""
    H, W = image_hw
    gh, gw = grid_hw
    out = np.empty((len(boxes), 4), dtype=np.int64)
    for i, (x, y, w, h) in enumerate(boxes):
        out[i, 0:2] = map_span(y, y + h, H, gh)
        out[i, 2:4] = map_span(x, x + w, W, gw)
    return out


# --------------------------------------------------------------------------------------------------
# Model plumbing: output tensor and classifier input
# --------------------------------------------------------------------------------------------------


def output_logits(output: Any) -> torch.Tensor:
    """The N×K×H×W logits of a segmentation model: the tensor itself or `output['out']` (aux ignored)."""
    import torch

    if isinstance(output, dict) or (hasattr(output, "keys") and hasattr(output, "__getitem__")):
        if "out" not in output:
            keys = ", ".join(map(str, list(output.keys())[:8]))
            raise ModelError(f"segmentation model returned a dict without 'out' (keys: {keys})")
        output = output["out"]
    if not isinstance(output, torch.Tensor):
        raise ModelError(
            "segmentation model must return an N×K×H×W tensor or a dict with 'out', "
            f"got {type(output).__name__}"
        )
    if output.ndim != 4:
        raise ModelError(f"segmentation model output must be N×K×H×W, got shape {tuple(output.shape)}")
    return output


def _is_aux(name: str) -> bool:
    return any(part.startswith("aux") for part in name.split("."))


def find_feature_layer(model: torch.nn.Module, num_classes: int, name: str | None = None) -> tuple[str, Any]:
    """The module whose *input* is the per-pixel feature.

    Default: the last `Conv2d` (in registration order, auxiliary heads skipped) with `num_classes`
    output channels — the final 1×1 classifier in FCN, DeepLabV3, LRASPP and most custom heads.
    """
    modules = dict(model.named_modules())
    if name:
        if name in modules and name != "":
            return name, modules[name]
        import difflib

        names = [n for n in modules if n]
        near = difflib.get_close_matches(name, names, n=5, cutoff=0.4)
        if not near:
            near = [n for n, m in modules.items() if n and _is_conv(m)][-5:]
        raise ModelError(f"--feature-layer '{name}' not found in the model; nearby names: {', '.join(near)}")
    found = None
    for n, m in modules.items():
        if _is_aux(n):
            continue
        if _is_conv(m) and getattr(m, "out_channels", None) == num_classes:
            found = (n, m)
    if found is None:
        convs = [f"{n}({getattr(m, 'out_channels', '?')})" for n, m in modules.items() if _is_conv(m)][-5:]
        raise ModelError(
            f"no Conv2d with {num_classes} output channels (the classifier) found; "
            f"name the classifier with --feature-layer (last convolutions: {', '.join(convs) or 'none'})"
        )
    return found


def _is_conv(module: Any) -> bool:
    import torch

    if isinstance(module, torch.nn.Conv2d):
        return True
    # TorchScript modules keep the original class name
    return getattr(module, "original_name", None) == "Conv2d"


# --------------------------------------------------------------------------------------------------
# Reduction: pixel maps -> per-unit means, on the device
# --------------------------------------------------------------------------------------------------


def pixel_uncertainty(logits: torch.Tensor) -> torch.Tensor:
    """K×h×w logits of one image -> 3×h×w float32 maps (entropy, bvsb, least_confidence).

    Softmax over K; entropy with the natural log (Eq. 5); bvsb = p2/p1 (Eq. 8); lc = 1 − p1.
    Processed in row chunks so the transient K×rows×w probabilities stay small on 1024×2048 inputs.
    """
    import torch

    from uwe_cli.uncertainty import bvsb, entropy, least_confidence

    k, h, w = logits.shape
    rows = max(1, PIXEL_CHUNK_ELEMENTS // max(1, k * w))
    out = torch.empty((3, h, w), dtype=torch.float32, device=logits.device)
    for r0 in range(0, h, rows):
        chunk = logits[:, r0 : r0 + rows].float()
        probs = torch.softmax(chunk, dim=0)
        out[0, r0 : r0 + rows] = entropy(probs, dim=0)
        out[1, r0 : r0 + rows] = bvsb(probs, dim=0)
        out[2, r0 : r0 + rows] = least_confidence(probs, dim=0)
        del probs, chunk
    return out


def _accum_dtype(device: torch.device) -> torch.dtype:
    import torch

    return torch.float32 if device.type == "mps" else torch.float64


def box_means(maps: torch.Tensor, spans: np.ndarray) -> torch.Tensor:
    """C×h×w maps and (y0, y1, x0, x1) spans -> B×C means over each span (float64 where possible).

    One span covering the whole grid is a plain mean; otherwise a summed-area table answers every
    box with four lookups, so thousands of small (or overlapping) regions cost one cumulative sum.
    """
    import torch

    c, h, w = maps.shape
    dtype = _accum_dtype(maps.device)
    if len(spans) == 1 and tuple(spans[0]) == (0, h, 0, w):
        return maps.to(dtype).mean(dim=(1, 2)).unsqueeze(0)
    table = torch.zeros((c, h + 1, w + 1), dtype=dtype, device=maps.device)
    table[:, 1:, 1:] = maps.to(dtype).cumsum(dim=1).cumsum(dim=2)
    s = torch.as_tensor(spans, device=maps.device)
    y0, y1, x0, x1 = s[:, 0], s[:, 1], s[:, 2], s[:, 3]
    sums = table[:, y1, x1] - table[:, y0, x1] - table[:, y1, x0] + table[:, y0, x0]  # C×B
    area = ((y1 - y0) * (x1 - x0)).to(dtype)
    return (sums / area).T


@dataclass
class UnitStats:
    """Pooled values of one image's units, on the host (small: B×3 and B×C)."""

    uncertainty: np.ndarray  # B×3 float32: entropy, bvsb, least_confidence
    feature: np.ndarray  # B×C float32
    heatmap: np.ndarray | None = None  # h×w float32 pixel uncertainty (only when requested)


def reduce_image(
    logits: torch.Tensor,
    features: torch.Tensor,
    image_hw: tuple[int, int],
    boxes: Sequence[tuple[int, int, int, int]],
    heatmap_measure: str | None = None,
) -> UnitStats:
    """One image's K×h×w logits and C×fh×fw features -> per-unit mean uncertainty and feature.

    `image_hw` is the size of the image the boxes refer to (the original image, before any resize).
    """
    maps = pixel_uncertainty(logits)
    unc = box_means(maps, map_boxes(boxes, image_hw, tuple(maps.shape[1:])))
    feat = box_means(features, map_boxes(boxes, image_hw, tuple(features.shape[1:])))
    heat = None
    if heatmap_measure is not None:
        heat = maps[MEASURES.index(heatmap_measure)].float().cpu().numpy()
    return UnitStats(
        uncertainty=unc.float().cpu().numpy(),
        feature=feat.float().cpu().numpy(),
        heatmap=heat,
    )


# --------------------------------------------------------------------------------------------------
# Heatmaps
# --------------------------------------------------------------------------------------------------

# A perceptually ordered dark-to-bright ramp (close to matplotlib's "inferno"), sampled at 9 stops.
_COLORMAP = np.array(
    [
        [0, 0, 4],
        [31, 12, 72],
        [85, 15, 109],
        [136, 34, 106],
        [186, 54, 85],
        [227, 89, 51],
        [249, 140, 10],
        [249, 201, 50],
        [252, 255, 164],
    ],
    dtype=np.float64,
)


def heatmap_scale(measure: str, num_classes: int) -> float:
    """The value mapped to the brightest colour: each measure's maximum, so colours compare across images."""
    if measure == "entropy":
        return math.log(num_classes)
    if measure == "least_confidence":
        return 1.0 - 1.0 / num_classes
    return 1.0


def colorize(values: np.ndarray, vmax: float) -> np.ndarray:
    """h×w values in [0, vmax] -> h×w×3 uint8 RGB."""
    t = np.clip(np.nan_to_num(values / max(vmax, 1e-12)), 0.0, 1.0) * (len(_COLORMAP) - 1)
    lo = np.floor(t).astype(np.int64)
    hi = np.minimum(lo + 1, len(_COLORMAP) - 1)
    frac = (t - lo)[..., None]
    rgb = _COLORMAP[lo] * (1.0 - frac) + _COLORMAP[hi] * frac
    return np.rint(rgb).astype(np.uint8)


# --------------------------------------------------------------------------------------------------
# The extraction run
# --------------------------------------------------------------------------------------------------


@dataclass
class SegmentationConfig(ExtractConfig):
    """`uwe extract segmentation`: the common options plus units (regions), resize and heatmaps."""

    feature_layer: str | None = None
    region_size: str | None = None
    region_stride: str | None = None
    resize: str | None = None
    mean: Sequence[float] | None = None
    std: Sequence[float] | None = None
    heatmaps: str | Path | None = None
    heatmap_measure: str = "entropy"

    def make_task(self) -> SegmentationTask:
        return SegmentationTask(self)


def parse_resize(text: str | None) -> tuple[int, int] | int | None:
    """`--resize`: None/'none' keeps the native size; N scales the shorter side to N; HxW is exact."""
    if text is None or str(text).strip().lower() in ("", "none", "native"):
        return None
    value = str(text).strip().lower()
    if re.fullmatch(r"-?\d+", value):
        n = int(value)
        if n <= 0:
            raise DataError(f"--resize must be positive, got '{text}'")
        return n
    return _parse_pair(value, "--resize")


class SegmentationTransform:
    """PIL image -> (normalised C×H×W tensor, original (H, W)). Picklable for DataLoader workers."""

    def __init__(
        self, resize: tuple[int, int] | int | None, mean: Sequence[float], std: Sequence[float]
    ) -> None:
        check_mean_std(mean, std)
        self.resize = resize
        self.mean = list(mean)
        self.std = list(std)

    def __call__(self, image: Any) -> tuple[Any, tuple[int, int]]:
        from torchvision.transforms import functional as F

        original = (image.height, image.width)
        if self.resize is not None:
            image = F.resize(image, self.resize if isinstance(self.resize, int) else list(self.resize))
        tensor = F.normalize(F.to_tensor(image), self.mean, self.std)
        return tensor, original


def _size_runs(samples: list[tuple[Any, tuple[int, int]]]) -> Iterator[list[int]]:
    """Positions of consecutive images with the same tensor size: each run is one forward pass."""
    run: list[int] = []
    for j, (tensor, _) in enumerate(samples):
        if run and tuple(tensor.shape) != tuple(samples[run[0]][0].shape):
            yield run
            run = []
        run.append(j)
    if run:
        yield run


def _rows(
    item: ImageItem,
    boxes: Sequence[tuple[int, int, int, int]],
    stats: UnitStats,
    schema: pa.Schema,
    regions: bool,
) -> pa.RecordBatch:
    n = len(boxes)
    columns: dict[str, Any] = {
        "id": [region_id(item.id, b) for b in boxes] if regions else [item.id],
        "source": [str(item.path)] * n,
        "feature": stats.feature,
    }
    for j, name in enumerate(MEASURES):
        columns[name] = stats.uncertainty[:, j].astype(np.float32)
    if regions:
        box = np.asarray(boxes, dtype=np.int32).reshape(n, 4)
        columns["image_id"] = [item.id] * n
        for j, name in enumerate(REGION_COLUMNS[1:]):
            columns[name] = box[:, j]
    return record_batch(schema, columns)


def heatmap_path(directory: str | Path, image_id: str) -> str | Path:
    """`DIR/<encoded image id>.png`: one file per ID, never outside DIR (see `file_name_for_id`)."""
    return storage.join(directory, file_name_for_id(image_id, ".png"))


def write_heatmap(path: str | Path, values: np.ndarray, vmax: float, size_hw: tuple[int, int]) -> None:
    """One colour-mapped PNG at the original image size (nearest-neighbour upscaling, no smoothing)."""
    from PIL import Image

    image = Image.fromarray(colorize(values, vmax), mode="RGB")
    if (image.height, image.width) != size_hw:
        image = image.resize((size_hw[1], size_hw[0]), Image.NEAREST)
    storage.save_png(path, image)


class SegmentationRunner(TappedModel):
    """A loaded model plus its feature hook: `forward` returns logits and classifier inputs for a batch.

    Separate from the run loop so tests and the benchmark use exactly the code path of the CLI.
    """

    def __init__(self, loaded: LoadedModel, num_classes: int | None, feature_layer: str | None) -> None:
        super().__init__(loaded)
        self.num_classes = num_classes
        self.requested_layer = feature_layer
        self.layer_name = ""
        if feature_layer:
            self._attach(num_classes or 0)  # a missing name fails before any image is read
        elif num_classes is not None:
            # Not found: decided after the first forward pass, which may explain better (K mismatch).
            with contextlib.suppress(ModelError):
                self._attach(num_classes)

    def _attach(self, num_classes: int) -> None:
        name, module = find_feature_layer(self.loaded.module, num_classes, self.requested_layer)
        self.tap = ForwardTap([module], name=name)
        self.layer_name = name

    def forward(self, images: Any) -> tuple[Any, Any]:
        """(logits B×K×h×w, features B×C×fh×fw), validated."""
        import torch

        logits = output_logits(self.loaded.module(images))
        if self.num_classes is not None and logits.shape[1] != self.num_classes:
            raise ModelError(
                f"model {self.loaded.name} outputs {logits.shape[1]} channels but --num-classes is "
                f"{self.num_classes}"
            )
        if logits.shape[1] < 2:
            raise ModelError(f"model {self.loaded.name} outputs {logits.shape[1]} class channel(s); need ≥ 2")
        if logits.shape[0] != images.shape[0]:
            raise ModelError(f"model returned {logits.shape[0]} outputs for {images.shape[0]} images")
        if self.tap is None:
            # K was unknown (or its classifier not found yet): hook the classifier, run the batch again.
            self.num_classes = int(logits.shape[1])
            self._attach(self.num_classes)
            return self.forward(images)
        features = self.tap.take()
        if not isinstance(features, torch.Tensor) or features.ndim != 4:
            shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
            raise ModelError(
                f"feature layer '{self.layer_name}' was not called with an N×C×H×W tensor (got {shape}); "
                "choose another --feature-layer"
            )
        if features.shape[0] != images.shape[0]:
            raise ModelError(
                f"feature layer '{self.layer_name}' saw {features.shape[0]} samples for {images.shape[0]} "
                "images; choose another --feature-layer"
            )
        return logits, features


class SegmentationTask(ExtractionTask):
    """Segmentation model → per image or region: mean pixel uncertainty and mean classifier-input feature."""

    name = "segmentation"
    default_batch_size = 2
    stack = False  # images of different sizes share a batch; equal-size runs share a forward pass
    cfg: SegmentationConfig

    def __init__(self, cfg: SegmentationConfig) -> None:
        super().__init__(cfg)
        self.runner: SegmentationRunner | None = None
        self._schema: pa.Schema | None = None
        self._meta: dict[str, Any] = {}
        self.heatmaps = 0

    def validate(self) -> None:
        cfg = self.cfg
        self.grid = parse_region_grid(cfg.region_size, cfg.region_stride)
        self.resize = parse_resize(cfg.resize)
        if cfg.heatmap_measure not in MEASURES:
            raise DataError(
                f"--heatmap-measure must be one of {', '.join(MEASURES)}, got '{cfg.heatmap_measure}'"
            )
        self.mean = tuple(cfg.mean) if cfg.mean is not None else IMAGENET_MEAN
        self.std = tuple(cfg.std) if cfg.std is not None else IMAGENET_STD
        check_mean_std(self.mean, self.std)
        self.heat_dir = storage.as_location(cfg.heatmaps) if cfg.heatmaps else None
        # Region pools resume by image: parts never split an image, so one image_id seen means done.
        self.resume_column = "image_id" if self.grid is not None else "id"

    def side_outputs(self) -> list[tuple[str | Path, str]]:
        return [(self.heat_dir, "--heatmaps")] if self.heat_dir is not None else []

    def load(self, device: Any) -> None:
        cfg = self.cfg
        loaded = load_model(
            cfg.model,
            "segmentation",
            cfg.num_classes,
            cfg.checkpoint,
            cfg.weights,
            device,
            cfg.trust_checkpoint,
        )
        if loaded.scripted:
            raise ModelError(
                f"TorchScript file {loaded.checkpoint}: the classifier input cannot be hooked inside a scripted "
                "model; save the whole module (torch.save(model)) or a state_dict instead"
            )
        self.loaded = loaded
        processor = getattr(loaded.weights_transform, "processor", None)
        if processor is not None:  # a transformers model: its own normalisation and input size by default
            if cfg.mean is None and getattr(processor, "image_mean", None) is not None:
                self.mean = tuple(float(v) for v in processor.image_mean)
            if cfg.std is None and getattr(processor, "image_std", None) is not None:
                self.std = tuple(float(v) for v in processor.image_std)
            size = getattr(processor, "size", None) or {}
            if cfg.resize is None and getattr(processor, "do_resize", False) and "height" in size:
                self.resize = (int(size["height"]), int(size["width"]))
        self.runner = SegmentationRunner(loaded, cfg.num_classes, cfg.feature_layer)
        self.use_amp = cfg.amp and device.type == "cuda"

    def fingerprint(self) -> dict[str, Any]:
        return {
            "model": self.loaded.name,
            "checkpoint": self.loaded.checkpoint_sha256,
            "feature_layer": self.cfg.feature_layer,
            "region": dataclasses.asdict(self.grid) if self.grid else None,
            "resize": self.resize,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    def transform(self) -> Any:
        return SegmentationTransform(self.resize, self.mean, self.std)

    def rows(self, items: list[ImageItem], payload: Any, device: Any) -> list[pa.RecordBatch]:
        import torch

        assert self.runner is not None
        out: list[pa.RecordBatch] = []
        measure = self.cfg.heatmap_measure if self.heat_dir is not None else None
        for run in _size_runs(payload):
            images = torch.stack([payload[j][0] for j in run]).to(device, non_blocking=True)
            with torch.inference_mode(), torch.autocast("cuda", dtype=torch.float16, enabled=self.use_amp):
                logits, features = self.runner.forward(images)
            if not bool(torch.isfinite(logits).all()) or not bool(torch.isfinite(features).all()):
                raise ModelError(f"model {self.loaded.name} produced NaN or Inf outputs")
            if self._schema is None:
                dim = int(features.shape[1])
                self._meta = self._metadata(dim)
                self._schema = unit_schema(dim, regions=self.grid is not None)
            for k, j in enumerate(run):
                item, hw = items[j], payload[j][1]
                boxes = unit_boxes(hw[1], hw[0], self.grid)
                stats = reduce_image(logits[k], features[k], hw, boxes, measure)
                if self.heat_dir is not None and stats.heatmap is not None:
                    vmax = heatmap_scale(self.cfg.heatmap_measure, int(logits.shape[1]))
                    write_heatmap(heatmap_path(self.heat_dir, item.id), stats.heatmap, vmax, hw)
                    self.heatmaps += 1
                out.append(_rows(item, boxes, stats, self._schema, self.grid is not None))
            del logits, features, images
        return out

    def _metadata(self, feature_dim: int) -> dict[str, Any]:
        loaded, grid, resize = self.loaded, self.grid, self.resize
        return self.pool_metadata(
            loaded.name, loaded.checkpoint_sha256, int(self.runner.num_classes or 0),
            list(self.cfg.class_names) if self.cfg.class_names else loaded.class_names, feature_dim,
            feature_layer=f"input of {self.runner.layer_name}",
            unit="region" if grid else "image",
            region_size=[grid.height, grid.width] if grid else None,
            region_stride=[grid.stride_y, grid.stride_x] if grid else None,
            resize=list(resize) if isinstance(resize, tuple) else resize,
        )  # fmt: skip

    def metadata(self) -> dict[str, Any]:
        return self._meta

    def details(self) -> dict[str, Any]:
        layer = self._meta.get("feature_layer") or (
            f"input of {self.runner.layer_name}" if self.runner else ""
        )
        return {"feature_layer": layer, "heatmaps": self.heatmaps}

    def close(self) -> None:
        if self.runner is not None:
            self.runner.close()


def extract_segmentation(cfg: SegmentationConfig, progress: ProgressFn | None = None) -> ExtractionResult:
    """Run the segmentation model over the images and write (or resume) the pool; never prints.

    Images are read in order; consecutive images of equal (transformed) size share a forward pass,
    so a folder of mixed sizes works with any batch size, and a `--resize HxW` run batches fully.
    """
    return run_extraction(SegmentationTask(cfg), progress)
