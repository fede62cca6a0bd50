"""Photographs for image classifiers, from installed packages, and the views made of them.

No photo collection ships on PyPI with a licence to redistribute, but several packages carry sample
photos as test data: scikit-image (18 photographs: a cat, coffee, a rocket, an astronaut, coins,
a retina, the Hubble deep field, ...), scikit-learn (two) and PyWavelets (two). Each photo is
recorded with the sha256 of its file, so a changed package changes the inputs' identity.

Evaluation sees every photo in 8 deterministic views (the centre crop, a mirror image, a closer
crop, four corner-ward crops, brightness, contrast and blur changes); calibration sees other
views of the same photos, random-resized crops drawn with a fixed seed, never an evaluation view.
No package here labels these photos with ImageNet classes, so quality is agreement with the float
model (top-1, top-5), not accuracy.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgequant.errors import EdgequantError

# (package, path inside it): photographs, not drawings or synthetic patterns.
PHOTOS = (
    *(("skimage", f"data/{name}") for name in (
        "astronaut.png", "brick.png", "camera.png", "cell.png", "chelsea.png", "clock_motion.png", "coffee.png",
        "coins.png", "grass.png", "gravel.png", "hubble_deep_field.jpg", "ihc.png", "moon.png", "motorcycle_left.png",
        "page.png", "retina.jpg", "rocket.jpg", "text.png")),
    ("sklearn", "datasets/images/china.jpg"),
    ("sklearn", "datasets/images/flower.jpg"),
    ("pywt", "data/aero.npz"),
    ("pywt", "data/ascent.npz"),
)
_PACKAGE_DISTRIBUTIONS = {"skimage": "scikit-image==0.26.0", "sklearn": "scikit-learn", "pywt": "PyWavelets==1.9.0"}
EVAL_VIEWS = ("centre", "mirror", "closer", "top-left", "bottom-right", "brighter", "contrast", "blur")
CALIBRATION_VIEWS_PER_PHOTO = 6
CALIBRATION_SEED = 1


@dataclass(frozen=True)
class Photo:
    name: str  # package/path
    sha256: str
    image: object  # PIL.Image in RGB


@dataclass(frozen=True)
class ImageInputs:
    images: np.ndarray  # (n, 3, size, size) float32, preprocessed
    views: list[str]  # "photo#view" per row
    photos: dict[str, str]  # photo -> sha256 of its file
    name: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.images.tobytes()).hexdigest()

    @property
    def groups(self) -> np.ndarray:
        """The photo each row was cut from, numbered: a bootstrap draws a photo's views together."""
        order = {photo: i for i, photo in enumerate(self.photos)}
        return np.array([order[view.split("#")[0]] for view in self.views])


def photos() -> list[Photo]:
    """Every photo in PHOTOS, decoded to RGB; a missing package is named with its install line."""
    from PIL import Image

    found = []
    for package, relative in PHOTOS:
        path = _package_dir(package) / relative
        if not path.is_file():
            raise EdgequantError(f"the sample photo {package}/{relative} is missing",
                                 f"pip install --no-deps {_PACKAGE_DISTRIBUTIONS[package]} (or `make setup`)")
        data = path.read_bytes()
        if path.suffix == ".npz":  # PyWavelets keeps its photos as 8-bit grey arrays
            with np.load(io.BytesIO(data)) as npz:
                image = Image.fromarray(np.asarray(npz[npz.files[0]], dtype=np.uint8))
        else:
            image = Image.open(io.BytesIO(data))
        found.append(Photo(f"{package}/{relative}", hashlib.sha256(data).hexdigest(), image.convert("RGB")))
    return found


def eval_images(settings) -> ImageInputs:
    """Every photo in each of EVAL_VIEWS, preprocessed for a model with `settings`."""
    rows, views, shots = [], [], photos()
    for photo in shots:
        for view in EVAL_VIEWS:
            rows.append(preprocess(_eval_view(photo.image, view, settings), settings))
            views.append(f"{photo.name}#{view}")
    name = f"{len(shots)} photographs from scikit-image, scikit-learn and PyWavelets x {len(EVAL_VIEWS)} views"
    return ImageInputs(np.stack(rows), views, {p.name: p.sha256 for p in shots}, name)


def calibration_images(settings, count: int) -> np.ndarray:
    """`count` seeded random-resized crops (with mirror images) of the photos, none an evaluation view."""
    rng = np.random.default_rng(CALIBRATION_SEED)
    shots = photos()
    rows = []
    for i in range(count):
        image = shots[i % len(shots)].image
        rows.append(preprocess(_random_crop(image, rng, settings), settings))
    return np.stack(rows)


def preprocess(image, settings) -> np.ndarray:
    """An RGB image -> (3, size, size) float32: the shorter side scaled to `resize`, the centre
    `size` square cut out, (pixel - mean) / std per channel."""
    from PIL import Image

    width, height = image.size
    scale = settings.resize / min(width, height)
    image = image.resize((max(settings.size, round(width * scale)), max(settings.size, round(height * scale))),
                         Image.Resampling.BILINEAR)
    width, height = image.size
    left, top = (width - settings.size) // 2, (height - settings.size) // 2
    pixels = np.asarray(image.crop((left, top, left + settings.size, top + settings.size)), dtype=np.float32)
    pixels = (pixels - np.asarray(settings.mean, np.float32)) / np.asarray(settings.std, np.float32)
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def _eval_view(image, view: str, settings):
    from PIL import ImageEnhance, ImageFilter, ImageOps

    width, height = image.size
    side = min(width, height)
    if view == "mirror":
        return ImageOps.mirror(image)
    if view == "closer":  # the centre 70%
        return _crop(image, (width - 0.7 * side) / 2, (height - 0.7 * side) / 2, 0.7 * side)
    if view == "top-left":
        return _crop(image, 0.1 * (width - 0.8 * side), 0.1 * (height - 0.8 * side), 0.8 * side)
    if view == "bottom-right":
        return _crop(image, 0.9 * (width - 0.8 * side), 0.9 * (height - 0.8 * side), 0.8 * side)
    if view == "brighter":
        return ImageEnhance.Brightness(image).enhance(1.3)
    if view == "contrast":
        return ImageEnhance.Contrast(image).enhance(0.7)
    if view == "blur":
        return image.filter(ImageFilter.GaussianBlur(radius=1.5))
    return image


def _random_crop(image, rng, settings):
    from PIL import ImageOps

    width, height = image.size
    side = min(width, height) * rng.uniform(0.35, 0.95)
    left, top = rng.uniform(0, width - side), rng.uniform(0, height - side)
    cropped = _crop(image, left, top, side)
    return ImageOps.mirror(cropped) if rng.random() < 0.5 else cropped


def _crop(image, left: float, top: float, side: float):
    return image.crop((round(left), round(top), round(left + side), round(top + side)))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # a top-level name: its __init__ is not run
    if spec is None or not spec.submodule_search_locations:
        raise EdgequantError(f"the package {package} holding sample photos is not installed",
                             f"pip install --no-deps {_PACKAGE_DISTRIBUTIONS[package]} (or `make setup`)")
    return Path(next(iter(spec.submodule_search_locations)))
