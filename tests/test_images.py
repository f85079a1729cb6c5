"""ImageSource: decoding every odd image format, and preprocessing by the input contract."""

import io
import json
import pickle
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torchvision import transforms

from featx.registry import InputContract
from featx.sources import BadFile, DecodeError, StimulusListError
from featx.sources.images import IMAGE_EXTENSIONS, ImageSource, MultiFrameWarning, decode_image

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = REPO / "examples" / "images"
TOL = 1 / 255


def contract(size=224, resize=256, value_range=(0.0, 1.0)):
    return InputContract(
        kind="image", value_range=value_range, mean=(0.485, 0.456, 0.406),
        std=(0.229, 0.224, 0.225), size=size, resize=resize, crop="center",
    )


def decoded(path, background=(255, 255, 255)) -> np.ndarray:
    """decode_image as float (H, W, 3) in [0, 1], whichever form it returned."""
    pixels = decode_image(path, background)
    if isinstance(pixels, Image.Image):
        assert pixels.mode == "RGB"
        return np.asarray(pixels, dtype=np.float64) / 255
    assert pixels.dtype == np.float32 and pixels.ndim == 3 and pixels.shape[2] == 3
    return pixels.astype(np.float64)


def photo_like(h, w, seed=0) -> np.ndarray:
    """Smooth structure plus noise, uint8 RGB: resampling differences show up here."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([np.sin(9 * x + 3 * y), np.cos(7 * y - 2 * x), np.sin(13 * x * y)], -1)
    noisy = 127.5 + 90 * base + rng.normal(0, 25, (h, w, 3))
    return noisy.clip(0, 255).astype(np.uint8)


def png_bytes(width, height, bit_depth, colour_type, rows: bytes) -> bytes:
    """A minimal PNG written by hand (for layouts Pillow will not write)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


# --- preprocessing against torchvision --------------------------------------------


@pytest.mark.parametrize("shape, suffix", [((375, 500), ".jpg"), ((333, 301), ".png"),
                                           ((600, 240), ".png"), ((224, 224), ".bmp")])
def test_matches_torchvision_route(tmp_path, shape, suffix):
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(photo_like(*shape)).save(path)
    source = ImageSource(tmp_path, contract())
    ours = source.load(0)
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    )(Image.open(path).convert("RGB"))
    assert ours.dtype == torch.float32 and ours.shape == (3, 224, 224)
    assert torch.allclose(ours, reference, atol=TOL, rtol=0)


def test_grayscale_and_palette_match_torchvision_route(tmp_path):
    gray = Image.fromarray(photo_like(300, 400)[..., 0])
    gray.save(tmp_path / "gray.png")
    gray.convert("RGB").quantize(64).save(tmp_path / "palette.png")
    source = ImageSource(tmp_path, contract())
    reference = transforms.Compose(
        [transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor()]
    )
    for i, s in enumerate(source.stimuli):
        expected = reference(Image.open(s.path).convert("RGB"))
        assert torch.allclose(source.load(i), expected, atol=TOL, rtol=0), s.id


def test_small_contract_and_value_range(tmp_path):
    Image.fromarray(photo_like(50, 80)).save(tmp_path / "a.png")
    unit = ImageSource(tmp_path, contract(size=16, resize=20)).load(0)
    assert unit.shape == (3, 16, 16) and 0 <= unit.min() and unit.max() <= 1
    scaled = ImageSource(tmp_path, contract(size=16, resize=20, value_range=(0.0, 255.0)))
    assert torch.allclose(scaled.load(0), unit * 255, atol=1e-4)


def test_bad_contracts(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    with pytest.raises(ValueError, match="resize"):
        ImageSource(tmp_path, contract(size=224, resize=200))
    audio = InputContract(kind="audio", value_range=(-1.0, 1.0), mean=(0.0,), std=(1.0,),
                          sample_rate=20000, duration=2.0)
    with pytest.raises(ValueError, match="AudioSource"):
        ImageSource(tmp_path, audio)


# --- decoding odd formats ---------------------------------------------------------


def test_16bit_grayscale_png_keeps_its_scale(tmp_path):
    values = np.full((20, 30), 40000, np.uint16)
    values[:, 15:] = 40100  # 100 / 65535 apart: less than one 8-bit step
    Image.fromarray(values).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    rgb = decoded(tmp_path / "g16.png")
    assert rgb[0, 0] == pytest.approx([40000 / 65535] * 3, abs=1e-6)  # ~0.61, not 1.0
    assert rgb[0, 20, 0] - rgb[0, 0, 0] == pytest.approx(100 / 65535, abs=1e-6)

    # Through load(): the resize works in float and keeps the full precision.
    out = ImageSource(tmp_path, contract(size=8, resize=8)).load(0)
    assert out[:, :, 0].numpy() == pytest.approx(40000 / 65535, abs=1e-5)
    assert out[:, :, -1].numpy() == pytest.approx(40100 / 65535, abs=1e-5)


def test_16bit_big_endian_tiff_and_pgm(tmp_path):
    big = Image.frombytes("I;16B", (6, 4), np.full((4, 6), 40000, ">u2").tobytes())
    big.save(tmp_path / "b16.tif")
    assert decoded(tmp_path / "b16.tif")[0, 0, 0] == pytest.approx(40000 / 65535, abs=1e-6)
    # A 16-bit PGM opens as mode "I".
    (tmp_path / "g16.pgm").write_bytes(b"P5\n6 4\n65535\n" + np.full((4, 6), 40000, ">u2").tobytes())
    assert Image.open(tmp_path / "g16.pgm").mode == "I"
    assert decoded(tmp_path / "g16.pgm")[0, 0, 0] == pytest.approx(40000 / 65535, abs=1e-6)


def test_32bit_integer_tiff_uses_its_declared_depth(tmp_path):
    Image.fromarray(np.full((4, 4), 2**30, np.int32)).save(tmp_path / "i32.tif")
    assert decoded(tmp_path / "i32.tif")[0, 0, 0] == pytest.approx(2**30 / (2**31 - 1))


def test_float_image(tmp_path):
    values = np.full((4, 4), 0.25, np.float32)
    values[0, 0] = 7.0  # out of range: clipped
    Image.fromarray(values).save(tmp_path / "f.tif")
    rgb = decoded(tmp_path / "f.tif")
    assert rgb[1, 1] == pytest.approx([0.25] * 3) and rgb[0, 0, 0] == 1.0


def test_16bit_rgb_png_is_read_at_8_bit_precision(tmp_path):
    rows = np.zeros((2, 3, 3), ">u2")
    rows[..., 0], rows[..., 1], rows[..., 2] = 40000, 0x1234, 65535
    raw = b"".join(b"\x00" + rows[i].tobytes() for i in range(2))
    (tmp_path / "rgb16.png").write_bytes(png_bytes(3, 2, 16, 2, raw))
    rgb = decoded(tmp_path / "rgb16.png")
    assert rgb[0, 0] == pytest.approx([40000 / 65535, 0x1234 / 65535, 1.0], abs=TOL)


def test_one_bit_and_grayscale(tmp_path):
    bits = Image.new("1", (4, 2), 0)
    bits.putpixel((1, 0), 1)
    bits.save(tmp_path / "bits.png")
    rgb = decoded(tmp_path / "bits.png")
    assert rgb[0, 0].tolist() == [0, 0, 0] and rgb[0, 1].tolist() == [1, 1, 1]
    Image.new("L", (4, 2), 51).save(tmp_path / "gray.png")
    assert decoded(tmp_path / "gray.png")[1, 3].tolist() == pytest.approx([0.2] * 3)


def test_palette_png_with_transparency(tmp_path):
    image = Image.new("P", (4, 2), 0)
    image.putpalette([255, 0, 0, 0, 0, 255])
    image.putpixel((3, 1), 1)
    image.save(tmp_path / "pal.png", transparency=1)
    white = decoded(tmp_path / "pal.png")
    assert white[0, 0].tolist() == [1, 0, 0]
    assert white[1, 3].tolist() == [1, 1, 1]  # transparent blue -> white
    teal = decoded(tmp_path / "pal.png", background=(0, 128, 255))
    assert teal[1, 3] == pytest.approx([0, 128 / 255, 1])
    assert teal[0, 0].tolist() == [1, 0, 0]
    # The same through the source, with its background setting.
    source = ImageSource(tmp_path, contract(size=2, resize=2), background=(0, 128, 255))
    assert source.settings()["background"] == [0, 128, 255]


def test_palette_with_partial_alpha(tmp_path):
    image = Image.new("P", (2, 1), 0)
    image.putpalette([200, 100, 0, 0, 0, 0])
    image.save(tmp_path / "pal_alpha.png", transparency=bytes([64]))  # index 0: alpha 64
    a = 64 / 255
    expected = [(200 * a + 255 * (1 - a)) / 255, (100 * a + 255 * (1 - a)) / 255, 1 - a]
    assert decoded(tmp_path / "pal_alpha.png")[0, 0] == pytest.approx(expected, abs=0.5 / 255)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_compositing(tmp_path, mode):
    rgba = Image.new("RGBA", (3, 2), (200, 100, 0, 255))
    rgba.putpixel((0, 0), (200, 100, 0, 64))
    rgba.putpixel((1, 0), (10, 20, 30, 0))
    image = rgba.convert(mode)
    image.save(tmp_path / "alpha.png")
    assert Image.open(tmp_path / "alpha.png").mode == mode
    colour = np.asarray(image.convert("RGBA"), dtype=np.float64)[0, 0, :3]
    a = 64 / 255
    for bg in [(255, 255, 255), (0, 64, 128)]:
        rgb = decoded(tmp_path / "alpha.png", background=bg)
        expected = (colour * a + np.array(bg) * (1 - a)) / 255
        assert rgb[0, 0] == pytest.approx(expected, abs=0.5 / 255 + 1e-9)
        assert rgb[0, 1] == pytest.approx(np.array(bg) / 255)  # fully transparent
        assert rgb[1, 1] == pytest.approx(colour / 255)  # opaque


def test_palette_alpha_mode():
    # "PA" never comes out of a PNG, but Pillow can hand it over from other routes.
    from featx.sources.images import _to_rgb8

    image = Image.new("PA", (2, 1))
    image.putpalette([200, 100, 0] + [0, 0, 0] * 255)
    image.putdata([(0, 64), (0, 255)])
    rgb = np.asarray(_to_rgb8(image, (0, 0, 0)), dtype=np.float64)
    assert rgb[0, 0] == pytest.approx([200 * 64 / 255, 100 * 64 / 255, 0], abs=0.5)
    assert rgb[0, 1].tolist() == [200, 100, 0]


def test_16bit_grayscale_with_transparent_value(tmp_path):
    values = np.array([[100, 40000]], np.uint16)
    Image.fromarray(values).save(tmp_path / "g16t.png", transparency=40000)
    rgb = decoded(tmp_path / "g16t.png", background=(0, 255, 0))
    assert rgb[0, 0] == pytest.approx([100 / 65535] * 3, abs=1e-6)
    assert rgb[0, 1] == pytest.approx([0, 1, 0])


@pytest.mark.parametrize("orientation, stored", [(6, Image.Transpose.ROTATE_90),
                                                  (8, Image.Transpose.ROTATE_270),
                                                  (3, Image.Transpose.ROTATE_180)])
def test_exif_orientation_is_applied(tmp_path, orientation, stored):
    # Upright picture: 32 high, 48 wide, four solid quadrants.
    upright = np.zeros((32, 48, 3), np.uint8)
    upright[:16, :24] = (255, 0, 0)
    upright[:16, 24:] = (0, 255, 0)
    upright[16:, :24] = (0, 0, 255)
    upright[16:, 24:] = (255, 255, 0)
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(upright).transpose(stored).save(tmp_path / "rot.jpg", quality=95, exif=exif)
    assert Image.open(tmp_path / "rot.jpg").getexif()[0x0112] == orientation

    rgb = decoded(tmp_path / "rot.jpg")
    assert rgb.shape == (32, 48, 3)
    for (ys, xs) in [(slice(2, 14), slice(2, 22)), (slice(2, 14), slice(26, 46)),
                     (slice(18, 30), slice(2, 22)), (slice(18, 30), slice(26, 46))]:
        assert rgb[ys, xs].mean((0, 1)) == pytest.approx(upright[ys, xs].mean((0, 1)) / 255,
                                                         abs=6 / 255)
    info = ImageSource(tmp_path, contract(size=8, resize=8)).image_info(0)
    assert (info.width, info.height) == (48, 32)


def test_cmyk_jpeg(tmp_path):
    cmyk = Image.new("CMYK", (32, 32), (0, 255, 255, 0))  # red
    cmyk.paste((0, 0, 0, 128), (16, 0, 32, 32))  # 50 % black
    cmyk.save(tmp_path / "cmyk.jpg", quality=95)
    reopened = Image.open(tmp_path / "cmyk.jpg")
    assert reopened.mode == "CMYK" and "adobe" in reopened.info  # stored inverted, Adobe-style
    rgb = decoded(tmp_path / "cmyk.jpg")
    assert rgb[4:12, 2:12].mean((0, 1)) == pytest.approx([1, 0, 0], abs=6 / 255)
    assert rgb[4:12, 20:30].mean((0, 1)) == pytest.approx([127 / 255] * 3, abs=6 / 255)


def test_cmyk_jpeg_with_unusable_icc_profile_falls_back(tmp_path, caplog):
    Image.new("CMYK", (16, 16), (0, 255, 255, 0)).save(
        tmp_path / "cmyk.jpg", icc_profile=b"not a profile"
    )
    rgb = decoded(tmp_path / "cmyk.jpg")
    assert rgb.mean((0, 1)) == pytest.approx([1, 0, 0], abs=6 / 255)
    assert "ICC profile unusable" in caplog.text


def test_animated_gif_gives_first_frame_and_warns(tmp_path):
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 255, 0), (0, 0, 255)]]
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:], duration=50)
    source = ImageSource(tmp_path, contract(size=8, resize=8))
    with pytest.warns(MultiFrameWarning, match="anim.gif.*3 frames") as record:
        first = source.load(0)
    assert record[0].filename == __file__  # stacklevel points at the caller
    assert first[:, 4, 4].tolist() == pytest.approx([1, 0, 0], abs=TOL)
    # Once per source: loading again (or checking) stays quiet. The test
    # configuration turns MultiFrameWarning into an error, so this would fail.
    source.load(0)
    assert source.check() == []
    assert source.columns()["image_frames"].tolist() == [3]


def test_multipage_tiff_warns_in_check(tmp_path):
    pages = [Image.new("L", (8, 8), v) for v in (10, 200)]
    pages[0].save(tmp_path / "pages.tif", save_all=True, append_images=pages[1:])
    source = ImageSource(tmp_path, contract(size=8, resize=8))
    with pytest.warns(MultiFrameWarning, match="pages.tif") as record:
        assert source.check() == []
    assert record[0].filename == __file__
    assert source.load(0)[0, 0, 0].item() == pytest.approx(10 / 255)


# --- check() and bad files --------------------------------------------------------


def make_bad_files(folder: Path) -> dict[str, str]:
    """Files that must be reported, and a word their reason must contain."""
    Image.fromarray(photo_like(64, 64)).save(folder / "good.jpg")
    data = (folder / "good.jpg").read_bytes()
    (folder / "truncated.jpg").write_bytes(data[: len(data) // 2])
    Image.fromarray(photo_like(64, 64)).save(folder / "good.png")
    data = (folder / "good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "text.png").write_text("this is not a picture\n")
    (folder / "zero.png").write_bytes(png_bytes(0, 5, 8, 2, b""))
    return {"truncated.jpg": "truncated", "truncated.png": "truncated",
            "empty.jpg": "empty", "text.png": "not an image", "zero.png": "zero size"}


def test_check_reports_bad_files(tmp_path):
    expected = make_bad_files(tmp_path)
    source = ImageSource(tmp_path, contract(size=16, resize=16))
    bad = source.check()
    assert all(isinstance(b, BadFile) for b in bad)
    reasons = {Path(b.path).name: b.reason for b in bad}
    assert sorted(reasons) == sorted(expected)
    for name, word in expected.items():
        assert word in reasons[name], (name, reasons[name])
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_load_of_a_bad_file_raises_a_readable_error(tmp_path):
    make_bad_files(tmp_path)
    source = ImageSource(tmp_path, contract(size=16, resize=16))
    index = [s.id for s in source.stimuli].index("truncated.jpg")
    with pytest.raises(DecodeError, match="truncated.jpg.*truncated") as info:
        source.load(index)
    assert isinstance(info.value, OSError) and info.value.path.endswith("truncated.jpg")


def test_drop_bad_files(tmp_path):
    make_bad_files(tmp_path)
    source = ImageSource(tmp_path, contract(size=16, resize=16))
    dropped = source.drop(source.check())
    assert len(dropped) == 5 and [s.id for s in source.stimuli] == ["good.jpg", "good.png"]
    assert source.check() == [] and len(source) == 2
    assert all(len(v) == 2 for v in source.columns().values())


# --- ids, order, records ----------------------------------------------------------


def test_ids_follow_natural_order_and_skip_hidden(tmp_path):
    for name in ["img10.jpg", "img2.jpg", "sub/img10.png", "sub/img2.png", "sub2/a.png"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (tmp_path / "._img2.jpg").write_bytes(b"\0\5\26\7AppleDouble")
    (tmp_path / "notes.txt").write_text("x")
    source = ImageSource(tmp_path, contract(size=4, resize=4))
    assert [s.id for s in source.stimuli] == [
        "img2.jpg", "img10.jpg", "sub/img2.png", "sub/img10.png", "sub2/a.png"
    ]
    assert source.check() == []


def test_stimulus_list_sets_order_and_ids(tmp_path):
    for name in ["a.png", "b.png"]:
        Image.new("RGB", (4, 4)).save(tmp_path / name)
    (tmp_path / "list.csv").write_text("id,path\nsecond,b.png\nfirst,a.png\n")
    source = ImageSource(None, contract(size=4, resize=4), stimuli_list=tmp_path / "list.csv")
    assert [s.id for s in source.stimuli] == ["second", "first"]
    (tmp_path / "bad.txt").write_text("a.png\nmissing.png\n")
    with pytest.raises(StimulusListError, match="missing.png"):
        ImageSource(tmp_path, contract(size=4, resize=4), stimuli_list=tmp_path / "bad.txt")


def test_single_file_and_file_sequence(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "one.png")
    Image.new("RGB", (4, 4)).save(tmp_path / "two.png")
    assert [s.id for s in ImageSource(tmp_path / "one.png", contract(4, 4)).stimuli] == ["one.png"]
    files = [tmp_path / "two.png", tmp_path / "one.png"]
    assert [s.id for s in ImageSource(files, contract(4, 4)).stimuli] == ["two.png", "one.png"]


def test_columns_and_settings(tmp_path):
    Image.new("RGB", (40, 30)).save(tmp_path / "a.png")
    (tmp_path / "b.jpg").write_bytes(b"")
    source = ImageSource(tmp_path, contract(size=16, resize=20))
    cols = source.columns()
    assert set(cols) >= {"stimulus_path", "stimulus_sha256", "stimulus_bytes"}
    assert cols["stimulus_path"].tolist() == [str(tmp_path / "a.png"), str(tmp_path / "b.jpg")]
    assert cols["stimulus_bytes"].dtype == np.int64 and cols["stimulus_bytes"][1] == 0
    assert len(cols["stimulus_sha256"][0]) == 64
    assert cols["image_width"].tolist() == [40, -1] and cols["image_mode"].tolist() == ["RGB", ""]
    settings = source.settings()
    assert settings["size"] == 16 and settings["resize"] == 20
    assert settings["background"] == [255, 255, 255]
    json.dumps(settings)


def test_background_forms(tmp_path):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    assert ImageSource(tmp_path, contract(4, 4), background="black").background == (0, 0, 0)
    assert ImageSource(tmp_path, contract(4, 4), background="#808080").background == (128,) * 3
    for bad in [(256, 0, 0), (1, 2), "not-a-colour", (0.5, 0.5, 0.5)]:
        with pytest.raises(ValueError, match="background"):
            ImageSource(tmp_path, contract(4, 4), background=bad)


def test_source_pickles_for_worker_processes(tmp_path):
    Image.fromarray(photo_like(20, 30)).save(tmp_path / "a.png")
    source = ImageSource(tmp_path, contract(size=8, resize=10))
    clone = pickle.loads(pickle.dumps(source))
    assert torch.equal(clone.load(0), source.load(0))


def test_extensions_cover_the_usual_formats():
    assert {"jpg", "jpeg", "png", "bmp", "gif", "tif", "tiff", "webp", "ppm", "pgm"} <= IMAGE_EXTENSIONS


# --- the bundled examples ---------------------------------------------------------


def test_bundled_examples():
    source = ImageSource(EXAMPLES, contract())
    assert [s.id for s in source.stimuli] == [
        "img1_astronaut.jpg", "img2_coffee.jpg", "img10_chelsea.jpg", "img11_camera_gray.jpg",
        "img12_rocket_exif6.jpg", "space/img2_hubble.jpg", "transparent/chelsea_cutout.png",
        "transparent/coffee_palette.png",
    ]
    assert source.check() == []
    cols = source.columns()
    modes = dict(zip((s.id for s in source.stimuli), cols["image_mode"]))
    assert modes["img11_camera_gray.jpg"] == "L"
    assert modes["transparent/chelsea_cutout.png"] == "RGBA"
    assert modes["transparent/coffee_palette.png"] == "P"
    rocket = [s.id for s in source.stimuli].index("img12_rocket_exif6.jpg")
    assert (cols["image_width"][rocket], cols["image_height"][rocket]) == (480, 320)
    for i in range(len(source)):
        x = source.load(i)
        assert x.shape == (3, 224, 224) and 0 <= x.min() and x.max() <= 1
    total = sum(p.stat().st_size for p in EXAMPLES.rglob("*") if p.is_file())
    assert total < 1_000_000
