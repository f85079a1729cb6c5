"""Issue 2's acceptance: featx's stores equal torchvision's own models, stage by stage.

For each torchvision-defined registry model, a random-init checkpoint is saved, featx
extracts every stage over the bundled images into a store, and a second route
computes the same stages with torchvision alone: PIL decoding, torchvision's
Resize/CenterCrop/ToTensor/Normalize, and FX feature extraction
(``create_feature_extractor``) on torchvision's model loaded from the same file.
"""

from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision import models, transforms
from torchvision.models.feature_extraction import create_feature_extractor

import featx

REPO = Path(__file__).resolve().parents[1]
IMAGES = REPO / "examples" / "images"
BUILDERS = {"alexnet": models.alexnet, "vgg19": models.vgg19, "resnet50": models.resnet50,
            "resnet101": models.resnet101}


def torchvision_input(path: str) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(path))
    if image.mode in ("RGBA", "LA", "P", "PA") or "transparency" in image.info:
        image = image.convert("RGBA")
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image)
    image = image.convert("RGB")
    pipeline = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
    ])
    return pipeline(image)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_store_equals_torchvision_route(name, tmp_path):
    torch.manual_seed(1234)  # not featx's default seed: the file's weights must be the ones used
    reference = BUILDERS[name](weights=None).eval()
    checkpoint = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), checkpoint)

    store = tmp_path / f"{name}.h5"
    featx.extract(name, IMAGES, store, weights=checkpoint, batch_size=4, workers=0, progress=False)

    entry = featx.get_entry(name)
    nodes = {s.module: s.name for s in entry.stages if s.module}
    fx = create_feature_extractor(reference, return_nodes=nodes)
    with h5py.File(store, "r") as f:
        paths = [p.decode() if isinstance(p, bytes) else p for p in f["stimulus_path"][:]]
        assert len(paths) >= 5
        for row, path in enumerate(paths):
            x = torchvision_input(path)
            with torch.no_grad():
                expected = fx(x[None])
            np.testing.assert_allclose(f["natural_image"][row], _denormalize(x), atol=1e-5)
            for stage in entry.stages:
                if not stage.module:
                    continue
                want = expected[stage.name][0].numpy()
                got = f[stage.name][row]
                assert got.shape == stage.shape
                scale = float(np.abs(want).max()) or 1.0
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * scale,
                                           err_msg=f"{name}.{stage.name} row {row} ({path})")


def _denormalize(x: torch.Tensor) -> np.ndarray:
    mean = torch.tensor([0.485, 0.456, 0.406])[:, None, None]
    std = torch.tensor([0.229, 0.224, 0.225])[:, None, None]
    return (x * std + mean).numpy()
