"""Rebuild the example images in this folder from scikit-image's sample data.

Needs scikit-image (for ``skimage.data``), Pillow and NumPy; none of them beyond
Pillow and NumPy is a featx dependency, so run it from a throwaway environment::

    python -m venv /tmp/skenv && /tmp/skenv/bin/pip install scikit-image pillow
    /tmp/skenv/bin/python examples/images/make_examples.py

Every picture used is public domain or CC0 according to the docstring of its
``skimage.data`` function (see README.md here). The output is deterministic for a
given Pillow version.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
from skimage import data

HERE = Path(__file__).resolve().parent
QUALITY = 90
ORIENTATION = 0x0112


def fit(image: Image.Image, longer: int) -> Image.Image:
    """Scale so that the longer side is ``longer`` pixels (Lanczos)."""
    scale = longer / max(image.size)
    size = (round(image.width * scale), round(image.height * scale))
    return image.resize(size, Image.Resampling.LANCZOS)


def save_jpeg(image: Image.Image, name: str, **kwargs) -> None:
    path = HERE / name
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, quality=QUALITY, optimize=True, **kwargs)


def soft_disc_alpha(width: int, height: int) -> np.ndarray:
    """Alpha channel: opaque ellipse fading to transparent over its outer 15 %."""
    y, x = np.mgrid[0:height, 0:width]
    r = np.hypot((x - (width - 1) / 2) / (width / 2), (y - (height - 1) / 2) / (height / 2))
    return (np.clip((1.0 - r) / 0.15, 0.0, 1.0) * 255).round().astype(np.uint8)


def main() -> None:
    # Plain RGB photographs; the names sort differently in natural and plain order.
    save_jpeg(fit(Image.fromarray(data.astronaut()), 400), "img1_astronaut.jpg")
    save_jpeg(fit(Image.fromarray(data.coffee()), 450), "img2_coffee.jpg")
    save_jpeg(fit(Image.fromarray(data.chelsea()), 450), "img10_chelsea.jpg")

    # Grayscale (mode L) JPEG.
    save_jpeg(fit(Image.fromarray(data.camera()), 384), "img11_camera_gray.jpg")

    # Stored sideways with EXIF orientation 6 ("rotate 90 degrees clockwise to
    # display"): viewers and featx show it upright, torchvision's route does not.
    rocket = fit(Image.fromarray(data.rocket()), 480)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    save_jpeg(rocket.transpose(Image.Transpose.ROTATE_90), "img12_rocket_exif6.jpg",
              exif=exif.tobytes())

    # A subfolder: folders are compared component by component.
    hubble = Image.fromarray(data.hubble_deep_field()).crop((100, 50, 900, 850))
    save_jpeg(fit(hubble, 400), "space/img2_hubble.jpg")

    # Transparency: an RGBA cut-out with a soft edge, and a palette image whose
    # corners use a fully transparent palette entry.
    cat = fit(Image.fromarray(data.chelsea()), 360)
    cat.putalpha(Image.fromarray(soft_disc_alpha(*cat.size)))
    (HERE / "transparent").mkdir(exist_ok=True)
    cat.save(HERE / "transparent" / "chelsea_cutout.png", optimize=True)

    coffee = fit(Image.fromarray(data.coffee()), 360).quantize(
        colors=127, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    alpha = soft_disc_alpha(*coffee.size)
    pixels = np.array(coffee)
    pixels[alpha == 0] = 127  # the one unused index, made transparent below
    palette = coffee.getpalette()[: 127 * 3] + [0, 0, 0]
    out = Image.fromarray(pixels, "P")
    out.putpalette(palette)
    out.save(HERE / "transparent" / "coffee_palette.png", transparency=127, optimize=True)


if __name__ == "__main__":
    main()
