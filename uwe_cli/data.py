"""Image sources for every extractor: folders, manifests, robust loading, sharding, DataLoaders.

An image's ID is what annotators receive, so it must be stable across runs and machines: the path
relative to the folder (POSIX separators), or the manifest's `id` column. Sources are listed in a
sorted order so that shards and resumed runs see the same sequence.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import math
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from uwe_cli import storage
from uwe_cli.errors import DataError, StorageError
from uwe_cli.schema import first_bad_id, id_problem

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
)
MANIFEST_EXTENSIONS = frozenset({".csv", ".parquet", ".pq"})
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageItem:
    """One image to process: its pool ID, where to read it, and what it looked like when listed.

    `stamp` (size, mtime in ns) lets a resumed extraction redo images that changed since the
    interrupted run; `key` (st_dev, st_ino) lets outputs be checked against inputs by identity. Both
    are None for an entry that cannot be stat'ed (a dangling symlink): it fails later, when read, as
    an unreadable image.
    """

    id: str
    path: str | Path  # a local path or a URL
    stamp: tuple[int, int | str] | None = None
    key: tuple[int, int] | None = None


def stat_item(image_id: str, path: Path) -> ImageItem:
    try:
        st = path.stat()
    except OSError:
        return ImageItem(image_id, path)
    return ImageItem(image_id, path, (st.st_size, st.st_mtime_ns), (st.st_dev, st.st_ino))


def list_images(source: str | Path) -> list[ImageItem]:
    """Images of a folder or URL prefix (recursive) or a manifest (CSV/Parquet with `id`, `path`), in
    stable order."""
    source = storage.as_location(source)
    if not storage.exists(source):
        raise DataError(f"image source not found: {source}")
    if storage.isdir(source):
        items = _scan_directory(source) if isinstance(source, Path) else _scan_prefix(str(source))
        if not items:
            exts = ", ".join(sorted(IMAGE_EXTENSIONS))
            raise DataError(f"no images found in {source} (looked for {exts}, recursively)")
    elif Path(storage.name(source)).suffix.lower() in MANIFEST_EXTENSIONS:
        items = read_manifest(source)
    else:
        raise DataError(f"--data must be a folder or a .csv/.parquet manifest, got {source}")
    bad = first_bad_id(item.id for item in items)
    if bad is not None:
        raise DataError(f"--data {source}: {id_problem(bad)}; rename the file or give it an ID in a manifest")
    return items


def _scan_directory(root: Path) -> list[ImageItem]:
    """Every image file below `root`, following symlinked folders; hidden entries are skipped.

    A symlink with an image extension is listed even when it dangles or loops (it is then reported
    as an unreadable image, not silently dropped); a symlinked folder that leads back to one of its
    own ancestors is an error, since following it would list the same images under endless paths.
    """
    items = []
    ancestors: dict[tuple[int, int], Path] = {}

    def walk(folder: Path, trail: tuple[tuple[int, int], ...]) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            raise DataError(f"cannot list folder {folder} in --data: {exc.strerror}") from None
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                st = path.stat()
                key = (st.st_dev, st.st_ino)
                if key in trail:
                    raise DataError(f"symlink loop in --data: {path} leads back to {ancestors[key]}")
                ancestors[key] = path
                walk(path, (*trail, key))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                items.append(stat_item(path.relative_to(root).as_posix(), path))

    st = root.stat()
    ancestors[(st.st_dev, st.st_ino)] = root
    walk(root, ((st.st_dev, st.st_ino),))
    items.sort(key=lambda item: item.id)
    return items


def _scan_prefix(prefix: str) -> list[ImageItem]:
    """Every image object below a URL prefix (hidden components skipped), IDs relative to the prefix."""
    return [
        ImageItem(rel, url, storage.stamp(info))
        for url, rel, info in storage.find(prefix, IMAGE_EXTENSIONS)  # type: ignore[misc]
    ]


def read_manifest(manifest: str | Path) -> list[ImageItem]:
    """A CSV or Parquet manifest with `id` and `path` columns; relative paths are relative to it.

    Paths may be URLs. Local files are checked (and stat'ed for resume) now; remote objects get a
    metadata request (size, ETag) and are not fetched until read, where a missing one is an
    unreadable image.
    """
    rows = _manifest_rows(manifest)
    if not rows:
        raise DataError(f"manifest {manifest} has no rows")
    items: list[ImageItem] = []
    seen: dict[str, int] = {}
    base = storage.parent(manifest)
    for row_number, (image_id, raw_path) in enumerate(rows, start=1):
        where = f"manifest {manifest}, row {row_number}"
        if image_id is None or str(image_id) == "":
            raise DataError(f"{where}: empty id")
        if raw_path is None or str(raw_path) == "":
            raise DataError(f"{where}: empty path")
        image_id = str(image_id)
        problem = id_problem(image_id)
        if problem is not None:
            raise DataError(f"{where}: {problem}")
        if image_id in seen:
            raise DataError(f"{where}: duplicate id '{image_id}' (first at row {seen[image_id]})")
        seen[image_id] = row_number
        raw = str(raw_path)
        if storage.is_url(raw) or (storage.is_url(base) and not raw.startswith("/")):
            items.append(ImageItem(image_id, raw if storage.is_url(raw) else storage.join(base, raw)))
            continue
        path = storage.local_path(raw).expanduser()
        if not path.is_absolute():
            path = Path(base) / path
        item = stat_item(image_id, path)
        if path.is_dir():
            raise DataError(f"{where}: {path} is a directory, not an image file")
        if item.stamp is None or not path.is_file():
            raise DataError(f"{where}: image file not found: {path}")
        items.append(item)
    remote = [i for i, item in enumerate(items) if storage.is_url(item.path)]
    if remote:  # stamped (size, ETag), so a resume redoes objects changed since
        found = storage.stamps([str(items[i].path) for i in remote])
        for i in remote:
            items[i] = dataclasses.replace(items[i], stamp=found[str(items[i].path)])
    return items


def _manifest_rows(manifest: str | Path) -> list[tuple[Any, Any]]:
    if storage.name(manifest).lower().endswith(".csv"):
        try:
            with io.StringIO(storage.read_bytes(manifest).decode("utf-8-sig"), newline="") as fh:
                reader = csv.DictReader(fh)
                columns = reader.fieldnames or []
                _check_manifest_columns(manifest, columns)
                return [(row.get("id"), row.get("path")) for row in reader]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise DataError(f"manifest {manifest} is not a readable CSV file ({exc})") from None
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        with storage.open_input(manifest) as fh:
            table = pq.read_table(fh)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(
            f"manifest {manifest} is not a readable Parquet file ({str(exc).splitlines()[0]})"
        ) from None
    _check_manifest_columns(manifest, table.column_names)
    return list(zip(table.column("id").to_pylist(), table.column("path").to_pylist(), strict=True))


def _check_manifest_columns(manifest: str | Path, columns: Sequence[str]) -> None:
    missing = [c for c in ("id", "path") if c not in columns]
    if missing:
        found = ", ".join(columns) if columns else "none"
        raise DataError(f"manifest {manifest} lacks column(s) {', '.join(missing)} (found: {found})")


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """`K/N` → (K, N) with 0 ≤ K < N (0-based, like Slurm array and torch ranks); None passes through."""
    if text is None or text == "":
        return None
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise DataError(f"--shard must look like K/N (e.g. 0/4), got '{text}'") from None
    if n < 1 or not 0 <= k < n:
        raise DataError(f"--shard {text}: need N ≥ 1 and 0 ≤ K < N (K is 0-based)")
    return k, n


def shard_items(items: Sequence[ImageItem], shard: tuple[int, int] | None) -> list[ImageItem]:
    """The K-th of N contiguous, disjoint slices; together the N shards cover every item once."""
    if shard is None:
        return list(items)
    k, n = shard
    size = len(items)
    return list(items[math.floor(k * size / n) : math.floor((k + 1) * size / n)])


_DECODE_ERRORS: tuple[type[BaseException], ...] = (OSError, ValueError, SyntaxError)


@contextlib.contextmanager
def open_image_file(path: str | Path) -> Iterator[Any]:
    """The one place an image file is opened (PIL, lazily decoded): every reader goes through here,
    so routing remote references elsewhere is a change in one function. DataError naming the file
    if it is missing, unreadable, not an image, or a decompression bomb."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        source: Any = io.BytesIO(storage.read_bytes(path)) if storage.is_url(path) else path
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(source) as img:
                yield img
    except StorageError as exc:
        raise DataError(f"cannot read image {exc}") from None
    except (*_DECODE_ERRORS, Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataError(f"cannot read image {path}: {reason}") from None


def _to_rgb(img: Any) -> Any:
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        # Composite on white so transparent pixels do not turn into arbitrary colours.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Any:
    """Open an image fully and convert it to RGB; DataError naming the file if it cannot be decoded."""
    with open_image_file(path) as img:
        img.load()
        return _to_rgb(img)


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) of the stored pixels, from the header only (no EXIF rotation, as the models see it)."""
    with open_image_file(path) as img:
        return int(img.width), int(img.height)


def load_thumbnail(path: str | Path, max_side: int) -> tuple[Any, tuple[int, int]]:
    """An RGB image fitting in max_side × max_side and the (width, height) of the full image.

    JPEGs are decoded at a reduced scale (`draft`), so a thumbnail costs a fraction of a full decode.
    """
    from PIL import Image

    with open_image_file(path) as img:
        size = (int(img.width), int(img.height))
        img.draft("RGB", (max_side, max_side))
        img.load()
        rgb = _to_rgb(img)
    rgb.thumbnail((max_side, max_side), Image.BILINEAR, reducing_gap=2.0)
    return rgb, size


def _check_preprocess(
    image_size: int, resize: int | None, mean: Sequence[float], std: Sequence[float]
) -> int:
    """Validate the preprocessing options; the resize to use (default image_size / 0.875)."""
    if image_size < 1:
        raise DataError(f"--image-size must be positive, got {image_size}")
    if resize is None:
        resize = round(image_size / 0.875)
    if resize < image_size:
        raise DataError(f"--resize ({resize}) must be at least --image-size ({image_size})")
    check_mean_std(mean, std)
    return resize


def check_mean_std(mean: Sequence[float], std: Sequence[float]) -> None:
    """Three finite numbers each, std positive: NaN or Inf would otherwise surface as model output errors."""
    if len(mean) != 3 or len(std) != 3:
        raise DataError("--mean and --std take three numbers each (R,G,B)")
    if not all(math.isfinite(v) for v in (*mean, *std)):
        raise DataError(f"--mean and --std must be finite numbers, got mean {list(mean)} std {list(std)}")
    if any(s <= 0 for s in std):
        raise DataError("--std values must be positive")


def classification_transform(
    image_size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> Callable[[Any], Any]:
    """Resize the shorter side, centre-crop, normalise: the usual evaluation transform of ImageNet models.

    One image at a time, PIL → normalised float tensor. Extraction uses the equivalent
    `classification_preprocess` (same arithmetic, normalisation done per batch); this one is the
    reference that tests and benchmarks compare against.
    """
    from torchvision import transforms

    resize = _check_preprocess(image_size, resize, mean, std)
    return transforms.Compose(
        [
            transforms.Resize(resize, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.ToTensor(),
            transforms.Normalize(list(mean), list(std)),
        ]
    )


@dataclass(frozen=True)
class ClassificationPreprocess:
    """An evaluation transform split in two: per-image geometry in the loader, per-batch normalisation.

    `geometry` runs in the DataLoader and turns a PIL image into a uint8 CHW tensor (resize,
    centre-crop, no arithmetic); `normalize` turns a stacked uint8 batch into float32 on the device
    with exactly the arithmetic of ToTensor + Normalize (x / 255, then (x - mean) / std), so the
    values are bit-identical to the one-image-at-a-time transform. Per-image float arithmetic is
    slow on CPU: torch parallelises each tiny op over its intra-op threads and, on a busy machine,
    ~1 ms of work turns into tens of ms of thread synchronisation; one op per batch does not.

    `mean`/`std` None means `geometry` already returns finished float tensors (a fallback for
    transforms that cannot be split); `normalize` then passes them through.
    """

    geometry: Callable[[Any], Any]
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def normalize(self, images: Any) -> Any:
        """uint8 (B, C, H, W) → normalised float32, on the tensor's device; float input unchanged."""
        import torch
        from torchvision.transforms.functional import normalize

        if images.dtype != torch.uint8 or self.mean is None or self.std is None:
            return images
        return normalize(images.to(torch.float32).div_(255), list(self.mean), list(self.std), inplace=True)


def classification_preprocess(
    image_size: int = 224,
    resize: int | None = None,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
) -> ClassificationPreprocess:
    """`classification_transform`, split into loader geometry (uint8 output) and batch normalisation."""
    from torchvision import transforms

    resize = _check_preprocess(image_size, resize, mean, std)
    geometry = transforms.Compose(
        [
            transforms.Resize(resize, antialias=True),
            transforms.CenterCrop(image_size),
            transforms.PILToTensor(),
        ]
    )
    return ClassificationPreprocess(geometry, tuple(float(m) for m in mean), tuple(float(s) for s in std))


def split_weights_transform(transform: Callable[[Any], Any]) -> ClassificationPreprocess:
    """A model's own evaluation transform split the same way: torchvision weights' `ImageClassification`,
    or a `Compose` of geometry, to-tensor and `Normalize` (timm's). Anything else (a transformers image
    processor) is kept whole in the loader (correct, only slower).
    """
    from torchvision import transforms

    if isinstance(transform, transforms.Compose):
        return _split_compose(transform)
    try:  # a private module of torchvision: if it ever moves, fall back to the whole transform
        from torchvision.transforms._presets import ImageClassification
    except ImportError:
        return ClassificationPreprocess(transform)
    if not isinstance(transform, ImageClassification):
        return ClassificationPreprocess(transform)
    geometry = transforms.Compose(
        [
            transforms.Resize(
                list(transform.resize_size),
                interpolation=transform.interpolation,
                antialias=transform.antialias,
            ),
            transforms.CenterCrop(list(transform.crop_size)),
            transforms.PILToTensor(),
        ]
    )
    return ClassificationPreprocess(
        geometry, tuple(float(m) for m in transform.mean), tuple(float(s) for s in transform.std)
    )


def _split_compose(transform: Any) -> ClassificationPreprocess:
    """[PIL geometry..., ToTensor-like, Normalize] → uint8 geometry in the loader + batch normalisation."""
    from torchvision import transforms

    steps = list(transform.transforms)
    geometric = (transforms.Resize, transforms.CenterCrop)
    n = 0
    while n < len(steps) and isinstance(steps[n], geometric):
        n += 1
    tail = steps[n:]
    to_tensor = len(tail) == 2 and type(tail[0]).__name__ in ("ToTensor", "MaybeToTensor")
    if not to_tensor or not isinstance(tail[1], transforms.Normalize) or tail[1].inplace:
        return ClassificationPreprocess(transform)
    geometry = transforms.Compose([*steps[:n], transforms.PILToTensor()])
    mean, std = tail[1].mean, tail[1].std
    return ClassificationPreprocess(
        geometry, tuple(float(m) for m in list(mean)), tuple(float(v) for v in list(std))
    )


@dataclass
class LoaderBatch:
    """What the DataLoader yields: positions into the item list, the good samples, and the failures."""

    indices: list[int]
    payload: Any  # stacked tensor (B, C, H, W), or a list of per-image samples; None when all failed
    failures: list[tuple[int, str]]


class ImageDataset:
    """A map-style torch dataset over ImageItems that never raises for a bad image.

    Failures come back as records so that the main process decides (error or skip) and the message
    stays one line; exceptions raised inside DataLoader workers would be wrapped in tracebacks.
    """

    def __init__(self, items: Sequence[ImageItem], transform: Callable[[Any], Any]) -> None:
        self.items = list(items)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[int, Any, str | None]:
        item = self.items[index]
        try:
            image = load_image(item.path)
            return index, self.transform(image), None
        except DataError as exc:
            return index, None, str(exc)
        except Exception as exc:  # a transform failing on an odd image is still that image's fault
            return index, None, f"cannot preprocess image {item.path}: {type(exc).__name__}: {exc}"


class Collate:
    """Keep the failures aside; stack the good tensors (`stack=True`) or keep them as a list.

    A class rather than a closure so that DataLoader worker processes can pickle it.
    """

    def __init__(self, stack: bool = True) -> None:
        self.stack = stack

    def __call__(self, samples: list[tuple[int, Any, str | None]]) -> LoaderBatch:
        good = [(i, t) for i, t, err in samples if err is None]
        failures = [(i, err) for i, _, err in samples if err is not None]
        payload = None
        if good:
            if self.stack:
                import torch

                payload = torch.stack([t for _, t in good])
            else:
                payload = [t for _, t in good]
        return LoaderBatch([i for i, _ in good], payload, failures)


class ThreadedLoader:
    """Batches of remote images fetched and decoded by a pool of threads, in order.

    For object stores the cost of an image is latency, not CPU: `concurrency` requests stay in flight
    (reading an object and decoding it release the GIL), so a high-latency store does not starve the
    model. Each image is fetched once; at most about 2 × `concurrency` decoded images wait in memory.
    """

    def __init__(
        self,
        items: Sequence[ImageItem],
        transform: Callable[[Any], Any],
        batch_size: int,
        concurrency: int,
        stack: bool,
    ) -> None:
        self.dataset = ImageDataset(items, transform)
        self.batch_size = batch_size
        self.concurrency = max(1, concurrency)
        self.collate = Collate(stack)

    def __iter__(self) -> Iterator[LoaderBatch]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        n = len(self.dataset)
        window = max(2 * self.concurrency, self.batch_size)
        with ThreadPoolExecutor(self.concurrency, thread_name_prefix="uwe-fetch") as pool:
            pending: deque[Any] = deque()
            submitted = 0
            batch: list[tuple[int, Any, str | None]] = []
            while submitted < n or pending:
                while submitted < n and len(pending) < window:
                    pending.append(pool.submit(self.dataset.__getitem__, submitted))
                    submitted += 1
                batch.append(pending.popleft().result())
                if len(batch) == self.batch_size or (not pending and submitted == n):
                    yield self.collate(batch)
                    batch = []


def check_loader_options(batch_size: int, num_workers: int) -> None:
    if batch_size < 1:
        raise DataError(f"--batch-size must be positive, got {batch_size}")
    if num_workers < 0:
        raise DataError(f"--num-workers must be ≥ 0, got {num_workers}")


def make_loader(
    items: Sequence[ImageItem],
    transform: Callable[[Any], Any],
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
    stack: bool = True,
    io_concurrency: int = 16,
) -> Any:
    """A loader over `items` in order, yielding `LoaderBatch` objects: torch's DataLoader for local
    files, a `ThreadedLoader` (`io_concurrency` requests in flight) when any image is remote.

    Keep per-image work in `transform` free of torch arithmetic (see ClassificationPreprocess): with
    num_workers=0 it runs in the main process on all intra-op threads. Worker processes already
    run single-threaded (torch's worker loop sets one thread).
    """
    from torch.utils.data import DataLoader

    check_loader_options(batch_size, num_workers)
    if any(storage.is_url(item.path) for item in items):
        return ThreadedLoader(items, transform, batch_size, io_concurrency, stack)
    return DataLoader(
        ImageDataset(items, transform),  # type: ignore[arg-type]
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=Collate(stack),
        pin_memory=pin_memory,
        prefetch_factor=(4 if stack else 2) if num_workers > 0 else None,
    )
