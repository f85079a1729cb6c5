"""Image stimuli: decode every file Pillow reads, then preprocess for a model.

Decoding (:func:`decode_image`) turns any image into RGB values in [0, 1]:

* the EXIF (or TIFF) orientation tag is applied, so the picture is upright;
* 1-bit, grayscale and palette images are expanded to RGB;
* 16-bit grayscale (``I;16``, ``I;16B``, ``I`` ...) is scaled by its true bit depth
  (a value of 40000 becomes 40000 / 65535), not clipped at 255 as Pillow's
  ``convert("RGB")`` would; 32-bit integer TIFFs are scaled by their declared
  depth and float (``F``) images are taken as values in [0, 1] (others clipped);
* transparency (``LA``, ``RGBA``, ``PA``, palette or colour-key ``tRNS``) is
  composited onto ``background`` (white by default) with
  ``out = alpha * pixel + (1 - alpha) * background``, in sRGB values;
* CMYK JPEGs (Adobe's inverted CMYK is un-inverted by Pillow when it reads the file)
  are converted through their embedded ICC profile to sRGB when they have one, else
  with the naive ``255 * (1 - C) * (1 - K)`` formula;
* animated GIF/WebP/PNG and multi-page TIFF files give their first frame, with a
  :class:`MultiFrameWarning` (MPO camera files, whose extra frames are previews or a
  second stereo view, give their primary image without a warning).

**Precision:** Pillow has no 16-bit-per-channel colour mode, so 16-bit RGB(A) PNG,
PPM and TIFF files are read at 8 bits per channel (the high byte: the scale is right,
the low byte is lost). Only grayscale keeps the full 16 bits.

Preprocessing follows the model's input contract exactly as torchvision's
``Compose([Resize(resize), CenterCrop(size), ToTensor()])`` does: the shorter side
is resized to ``resize`` (bilinear, antialiased), then the centre ``size`` x ``size``
square is cut out. 8-bit images are resized by Pillow through torchvision's own
functional ops, so the result equals that torchvision pipeline applied to
``Image.open(path).convert("RGB")`` (for an upright, opaque RGB file) bit for bit.
Images with more than 8 bits are resized as float32 tensors with torch's antialiased
bilinear kernel (the same kernel, without rounding to 8 bits in between).
"""

from __future__ import annotations

import io
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image, ImageColor, ImageFile, ImageOps, UnidentifiedImageError
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from featx.sources.common import (
    BadFile,
    DecodeError,
    FileSource,
    Stimulus,
    make_stimuli,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageInfo",
    "ImageSource",
    "MultiFrameWarning",
    "decode_image",
]

logger = logging.getLogger(__name__)

#: File extensions that :class:`ImageSource` picks up when walking a folder.
IMAGE_EXTENSIONS = frozenset(
    {
        "jpg", "jpeg", "jpe", "jfif", "png", "apng", "bmp", "dib", "gif",
        "tif", "tiff", "webp", "avif", "ppm", "pgm", "pbm", "pnm",
    }
)  # fmt: skip

_HIGH_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I;16S", "I", "F"})
_ALPHA_MODES = frozenset({"LA", "La", "RGBA", "RGBa", "PA"})
_TIFF_BITS_PER_SAMPLE = 258
_TIFF_SAMPLE_FORMAT = 339
_WHITE = (255, 255, 255)


class MultiFrameWarning(UserWarning):
    """An animated or multi-page image file was read; only its first frame is used."""


@dataclass(frozen=True)
class ImageInfo:
    """What a file held before decoding (recorded per row in the store)."""

    width: int  # after the orientation tag is applied
    height: int
    mode: str  # Pillow's mode of the (first) frame, e.g. "RGB", "I;16", "P"
    format: str  # Pillow's format name, e.g. "JPEG"
    frames: int


# --- decoding -------------------------------------------------------------------


def _parse_background(background: Any) -> tuple[int, int, int]:
    if isinstance(background, str):
        try:
            rgb = ImageColor.getrgb(background)[:3]
        except ValueError:
            raise ValueError(
                f"background {background!r} is not a colour; give a name such as "
                f"'white', a hex value such as '#808080', or three values 0-255"
            ) from None
        return tuple(int(v) for v in rgb)  # type: ignore[return-value]
    values = tuple(background)
    if len(values) != 3 or not all(
        isinstance(v, (int, np.integer)) and 0 <= v <= 255 for v in values
    ):
        raise ValueError(
            f"background must be three integers 0-255 (R, G, B) or a colour name, "
            f"got {background!r}"
        )
    return tuple(int(v) for v in values)  # type: ignore[return-value]


def _orientation(im: Image.Image) -> int:
    try:
        return int(im.getexif().get(ExifTags.Base.Orientation, 1))
    except Exception as exc:  # a malformed EXIF block must not lose the image
        name = getattr(im, "filename", "")
        logger.warning("ignoring unreadable EXIF data in %s: %s", name, exc)
        return 1


def _upright(im: Image.Image) -> Image.Image:
    if _orientation(im) in (1, 0):
        return im
    return ImageOps.exif_transpose(im)


def _composite(rgba: np.ndarray, alpha: np.ndarray, background) -> np.ndarray:
    # rgba: float (H, W, 3) colour, alpha: float (H, W, 1) in [0, 1].
    bg = np.asarray(background, dtype=np.float32)
    return rgba * alpha + bg * (1.0 - alpha)


def _to_rgb8(
    im: Image.Image, background: tuple[int, int, int], path: str = ""
) -> Image.Image:
    """8-bit data of any mode -> opaque 8-bit RGB."""
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = np.asarray(im.convert("RGBA"), dtype=np.float32)
        if rgba[..., 3].min() == 255:
            return Image.fromarray(rgba[..., :3].astype(np.uint8), "RGB")
        out = _composite(rgba[..., :3], rgba[..., 3:] / 255.0, background)
        return Image.fromarray(np.rint(out).clip(0, 255).astype(np.uint8), "RGB")
    if im.mode == "CMYK":
        return _cmyk_to_rgb(im, path)
    return im.convert("RGB")


def _cmyk_to_rgb(im: Image.Image, path: str = "") -> Image.Image:
    icc = im.info.get("icc_profile")
    if icc:
        try:
            from PIL import ImageCms

            profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            srgb = ImageCms.createProfile("sRGB")
            return ImageCms.profileToProfile(im, profile, srgb, outputMode="RGB")
        except Exception as exc:
            logger.warning(
                "CMYK image %s: embedded ICC profile unusable (%s); using the naive "
                "CMYK to RGB formula",
                path,
                exc,
            )
    return im.convert("RGB")


def _integer_scale(im: Image.Image, values: np.ndarray) -> float:
    """Full-scale value of integer grayscale data, from the file's true bit depth."""
    bits, signed = None, im.mode == "I;16S"
    tags = getattr(im, "tag_v2", None)  # TIFF
    if tags is not None:
        declared = tags.get(_TIFF_BITS_PER_SAMPLE)
        if isinstance(declared, (tuple, list)):
            declared = declared[0]
        bits = int(declared) if declared else None
        fmt = tags.get(_TIFF_SAMPLE_FORMAT)
        if isinstance(fmt, (tuple, list)):
            fmt = fmt[0]
        signed = signed or fmt == 2
    if bits is None:
        if im.mode.startswith("I;16"):
            bits = 16
        else:  # "I" from PNG / PGM (rescaled by Pillow to 16 bits) or other 32-bit
            bits = 16 if values.size == 0 or values.max() <= 65535 else 32
            signed = signed or bits == 32
    return float(2 ** (bits - 1) - 1 if signed else 2**bits - 1)


def _to_float_rgb(
    im: Image.Image, background: tuple[int, int, int], path: str = ""
) -> np.ndarray:
    """High-bit-depth grayscale (``I;16*``, ``I``, ``F``) -> float32 (H, W, 3) in [0, 1]."""
    values = np.asarray(im)
    if im.mode == "F":
        gray = np.nan_to_num(values.astype(np.float64), nan=0.0)
        if gray.size and (gray.min() < 0 or gray.max() > 1):
            logger.warning(
                "float image %s has values in [%g, %g]; featx takes float images as "
                "intensities in [0, 1] and clips the rest",
                path,
                gray.min(),
                gray.max(),
            )
    else:
        gray = values.astype(np.float64) / _integer_scale(im, values)
    gray = np.clip(gray, 0.0, 1.0).astype(np.float32)[..., None]

    transparent = im.info.get("transparency")
    if isinstance(transparent, (int, np.integer)) and im.mode != "F":
        alpha = (values != transparent).astype(np.float32)[..., None]
        bg = np.asarray(background, np.float32) / 255.0
        return np.ascontiguousarray(_composite(gray, alpha, bg), dtype=np.float32)
    return np.repeat(gray, 3, axis=2)


def _read(
    path: str, background: tuple[int, int, int], stacklevel: int | None
) -> tuple[Image.Image | np.ndarray, ImageInfo]:
    """Open, take the first frame, orient upright and decode to opaque RGB.

    Returns an 8-bit RGB PIL image, or float32 (H, W, 3) in [0, 1] for
    high-bit-depth data, and the file's :class:`ImageInfo`. A multi-frame file
    warns with ``stacklevel`` as seen from here (``None``: no warning).
    """
    with Image.open(path) as im:
        frames = int(getattr(im, "n_frames", 1))
        if frames > 1:
            im.seek(0)
            if stacklevel is not None and im.format != "MPO":
                warnings.warn(
                    f"{path!r} has {frames} frames ({im.format}); featx uses the "
                    f"first frame only",
                    MultiFrameWarning,
                    stacklevel=stacklevel,
                )
        im.load()
        mode, fmt = im.mode, im.format or ""
        upright = _upright(im)
        if upright.width == 0 or upright.height == 0:
            raise DecodeError(
                path, f"image has zero size ({upright.width}x{upright.height})"
            )
        info = ImageInfo(upright.width, upright.height, mode, fmt, frames)
        if mode in _HIGH_DEPTH_MODES:
            return _to_float_rgb(upright, background, path), info
        return _to_rgb8(upright, background, path), info


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
)


def _header_size(kind: str, head: bytes) -> tuple[int, int] | None:
    # Width and height from the fixed header of a PNG or GIF, if it has one.
    if kind == "PNG" and head[12:16] == b"IHDR" and len(head) >= 24:
        return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")
    if kind == "GIF" and len(head) >= 10:
        return int.from_bytes(head[6:8], "little"), int.from_bytes(head[8:10], "little")
    return None


def _unidentified(path: str) -> str:
    with open(path, "rb") as f:
        head = f.read(32)
    kind = next((k for magic, k in _MAGIC if head.startswith(magic)), None)
    if kind is None:
        if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
            kind = "WebP"
        else:
            return f"not an image Pillow can identify (file starts with {head[:16]!r})"
    size = _header_size(kind, head)
    if size is not None and 0 in size:
        return f"image has zero size ({size[0]}x{size[1]} in its {kind} header)"
    return f"{kind} file with a header Pillow rejects (corrupt or unsupported)"


def _reason(path: str, exc: BaseException) -> str:
    """A readable explanation of why a file cannot be decoded."""
    if isinstance(exc, DecodeError):
        return exc.reason
    if isinstance(exc, FileNotFoundError):
        return "file does not exist"
    if os.path.isfile(path) and os.path.getsize(path) == 0:
        return "empty file (0 bytes)"
    if isinstance(exc, UnidentifiedImageError):
        return _unidentified(path)
    if isinstance(exc, Image.DecompressionBombError):
        return f"image too large to decode safely ({exc})"
    text = str(exc)
    if "truncated" in text.lower() or isinstance(exc, EOFError):
        return f"truncated image data ({text})"
    return f"cannot decode: {type(exc).__name__}: {text}"


def decode_image(
    path: str | os.PathLike, background: Any = _WHITE
) -> Image.Image | np.ndarray:
    """Decode an image file to opaque, upright RGB (see the module docstring).

    Returns:
        An 8-bit ``RGB`` PIL image, or for high-bit-depth grayscale a float32 array
        of shape (H, W, 3) with values in [0, 1].

    Raises:
        featx.sources.DecodeError: The file cannot be decoded; the message says why.
    """
    path = os.fspath(path)
    background = _parse_background(background)
    try:
        pixels, _ = _read(path, background, stacklevel=3)
    except Exception as exc:
        raise DecodeError(path, _reason(path, exc)) from exc
    return pixels


# --- the source -----------------------------------------------------------------


def _check_contract(contract) -> tuple[int, int, tuple[float, float]]:
    kind = getattr(contract, "kind", "image")
    if kind != "image":
        raise ValueError(
            f"ImageSource needs an image input contract, got kind={kind!r}; "
            f"use AudioSource for audio models"
        )
    size, resize = contract.size, contract.resize
    if not isinstance(size, int) or size <= 0:
        raise ValueError(f"input contract size must be a positive integer, got {size!r}")
    resize = size if resize is None else resize
    if not isinstance(resize, int) or resize < size:
        raise ValueError(
            f"input contract resize must be an integer >= size ({size}), got {resize!r}"
        )
    crop = getattr(contract, "crop", "center")
    if crop not in ("center", None):
        raise ValueError(f"input contract crop must be 'center', got {crop!r}")
    lo, hi = (float(v) for v in getattr(contract, "value_range", (0.0, 1.0)))
    return size, resize, (lo, hi)


class ImageSource(FileSource):
    """Image files, decoded and preprocessed for one model's input contract.

    Args:
        root_or_files: A folder (walked recursively in natural order, hidden files
            skipped; ids are paths relative to it), a single image file, or a
            sequence of image files (kept in the given order; ids relative to their
            common folder). With ``stimuli_list``, the folder that relative paths in
            the list refer to (``None``: the list's own folder).
        contract: The model's :class:`featx.registry.InputContract` (``size``,
            ``resize``, ``crop``, ``value_range``).
        background: RGB colour (three integers 0-255, or a colour name / hex
            string) that transparent pixels are composited onto. White by default.
        stimuli_list: A list file giving the order and ids explicitly (see
            :func:`featx.sources.read_stimulus_list`).

    ``load(i)`` returns a float32 tensor (3, size, size) with values in [0, 1]
    (mapped linearly onto ``contract.value_range`` if that is not [0, 1]).
    """

    def __init__(
        self,
        root_or_files: str | os.PathLike | Sequence[str | os.PathLike] | None,
        contract,
        background: Any = _WHITE,
        stimuli_list: str | os.PathLike | None = None,
    ):
        self.contract = contract
        self.size, self.resize, self.value_range = _check_contract(contract)
        self.background = _parse_background(background)
        self.stimuli_list = None if stimuli_list is None else str(stimuli_list)
        self.stimuli: list[Stimulus] = _find_stimuli(root_or_files, stimuli_list)
        self._info: dict[str, ImageInfo] = {}
        self._warned: set[str] = set()

    # -- decoding

    def _decode(self, path: str, stacklevel: int):
        # ``stacklevel`` as seen from here: 3 points at the caller of load / check.
        # A multi-frame file warns once per source, on its first decoding.
        warn_at = None if path in self._warned else stacklevel + 1
        try:
            pixels, info = _read(path, self.background, stacklevel=warn_at)
        except Exception as exc:
            raise DecodeError(path, _reason(path, exc)) from exc
        if info.frames > 1:
            self._warned.add(path)
        self._info[path] = info
        return pixels

    def check(self) -> list[BadFile]:
        """Open and fully decode every file; return those that cannot be used."""
        if ImageFile.LOAD_TRUNCATED_IMAGES:
            logger.warning(
                "PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True (set by some other code): "
                "Pillow fills truncated images with grey instead of failing, so "
                "check() cannot detect them"
            )
        bad = []
        for stimulus in self.stimuli:
            try:
                self._decode(stimulus.path, stacklevel=3)
            except DecodeError as exc:
                logger.debug("bad image %s: %s", stimulus.path, exc.reason)
                bad.append(BadFile(stimulus.path, exc.reason))
        return bad

    def load(self, i: int) -> torch.Tensor:
        """Decode and preprocess stimulus ``i``: float32 tensor (3, size, size)."""
        pixels = self._decode(self.stimuli[i].path, stacklevel=3)
        if isinstance(pixels, Image.Image):
            tensor = self._preprocess_rgb8(pixels)
        else:
            tensor = self._preprocess_float(pixels)
        lo, hi = self.value_range
        if (lo, hi) != (0.0, 1.0):
            tensor = tensor.mul_(hi - lo).add_(lo)
        return tensor

    def _preprocess_rgb8(self, im: Image.Image) -> torch.Tensor:
        # torchvision's Resize / CenterCrop on the PIL image, then ToTensor's scaling.
        im = TF.resize(
            im, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        im = TF.center_crop(im, [self.size, self.size])
        return TF.pil_to_tensor(im).to(torch.float32).div_(255)

    def _preprocess_float(self, rgb: np.ndarray) -> torch.Tensor:
        tensor = torch.from_numpy(rgb).permute(2, 0, 1).contiguous()
        tensor = TF.resize(
            tensor, [self.resize], interpolation=InterpolationMode.BILINEAR, antialias=True
        )
        return TF.center_crop(tensor, [self.size, self.size]).clamp_(0.0, 1.0)

    # -- records

    def image_info(self, i: int) -> ImageInfo | None:
        """Size, mode, format and frame count of stimulus ``i`` (None if unreadable)."""
        path = self.stimuli[i].path
        if path not in self._info:
            try:
                with Image.open(path) as im:
                    w, h = im.size
                    if _orientation(im) in (5, 6, 7, 8):
                        w, h = h, w
                    self._info[path] = ImageInfo(
                        w, h, im.mode, im.format or "", int(getattr(im, "n_frames", 1))
                    )
            except Exception:
                return None
        return self._info[path]

    def columns(self) -> dict[str, np.ndarray]:
        """Per-row metadata: file path, hash and size, plus the image's own size,
        Pillow mode and frame count (-1 / "" for files that cannot be read)."""
        infos = [self.image_info(i) for i in range(len(self))]
        cols = super().columns()
        cols["image_width"] = np.array([x.width if x else -1 for x in infos], np.int64)
        cols["image_height"] = np.array([x.height if x else -1 for x in infos], np.int64)
        cols["image_mode"] = np.array([x.mode if x else "" for x in infos], dtype=object)
        cols["image_frames"] = np.array([x.frames if x else -1 for x in infos], np.int64)
        return cols

    def settings(self) -> dict[str, Any]:
        """Every parameter that determines the values ``load`` returns."""
        return {
            "source": "image",
            "size": self.size,
            "resize": self.resize,
            "crop": "center",
            "interpolation": "bilinear",
            "antialias": True,
            "resize_precision": "8-bit images: Pillow via torchvision; "
            "high-bit-depth: float32 via torch",
            "value_range": list(self.value_range),
            "background": list(self.background),
            "alpha": "composited onto background in sRGB values",
            "orientation": "EXIF orientation applied",
            "frames": "first frame",
            "cmyk": "embedded ICC profile to sRGB, else naive formula",
            "high_bit_depth": "scaled by the file's bit depth",
            "dtype": "float32",
        }

    def __repr__(self) -> str:
        return (
            f"ImageSource({len(self)} images, size={self.size}, resize={self.resize}, "
            f"background={self.background})"
        )


def _find_stimuli(root_or_files, stimuli_list) -> list[Stimulus]:
    if stimuli_list is not None:
        if root_or_files is not None and not (
            isinstance(root_or_files, (str, os.PathLike)) and Path(root_or_files).is_dir()
        ):
            raise ValueError(
                f"with a stimulus list, the inputs must be the folder its relative "
                f"paths refer to (or None), got {root_or_files!r}"
            )
        return make_stimuli(root=root_or_files, stimuli_list=stimuli_list)
    if root_or_files is None:
        raise TypeError("ImageSource needs a folder, image files or a stimulus list")
    if isinstance(root_or_files, (str, os.PathLike)):
        path = Path(root_or_files).expanduser()
        if path.is_file() and path.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS:
            return make_stimuli([path])
        return make_stimuli(root=path, extensions=IMAGE_EXTENSIONS)
    return make_stimuli(list(root_or_files))
