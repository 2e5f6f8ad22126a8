"""Pixel preprocessing (ingest/imaging/preprocess.py): the paper's recipe, real codecs, malformed input."""

import importlib.util
import io
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from factories import image_dataset, ramp, textured_pixels
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import apply_modality_lut
from pydicom.pixels import pixel_array as decode_pixels
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
)

from ingest.imaging.png import encode_png
from ingest.imaging.preprocess import (
    REASONS,
    DecodeError,
    NoPixelData,
    PreprocessError,
    PreprocessParams,
    UnsupportedPhotometric,
    apply_clahe,
    main,
    percentiles,
    pixels_to_unit,
    preprocess_array,
    preprocess_dataset,
    preprocess_file,
    quantize,
    resize_pad,
    stored_values,
)

MONOCHROME1_CR = "dicomdirtests/77654033/CR1/6154"  # pydicom ships it: CR, MONOCHROME1, RescaleSlope 0.684


@pytest.fixture(autouse=True)
def _quiet_pydicom():
    # pydicom warns about the odd headers its own test files carry on purpose
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def pydicom_file(name: str) -> str:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom test file {name} is missing from this pydicom install"
    return path


def reference_unit(ds: Dataset, low: float = 0.5, high: float = 99.5) -> np.ndarray:
    """The recipe spelled out literally, in float64, to check the folded/fast implementation against:
    modality LUT, invert MONOCHROME1, percentiles of the non-padding pixels, clip, min-max, padding → 0."""
    stored = ds.pixel_array
    stored = stored[0] if stored.ndim == 3 else stored
    padding = np.zeros(stored.shape, bool)
    if "PixelPaddingValue" in ds:
        padding = stored == ds.PixelPaddingValue
    values = apply_modality_lut(stored, ds).astype(np.float64)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        values = values.max() - values
    lo, hi = np.percentile(values[~padding], [low, high])
    unit = (np.clip(values, lo, hi) - lo) / (hi - lo)
    unit[padding] = 0
    return unit


# -- params --
def test_params_defaults_are_the_papers_and_round_trip():
    params = PreprocessParams()
    assert params.to_dict() == {
        "size": 512,
        "clip_low_pct": 0.5,
        "clip_high_pct": 99.5,
        "clahe": False,
        "clahe_clip": 2.0,
        "clahe_tiles": 8,
        "output_dtype": "uint8",
        "decode": "full",
    }
    assert PreprocessParams(**params.to_dict()) == params


@pytest.mark.parametrize(
    ("fields", "hint"),
    [
        ({"size": 0}, "size must be an integer"),
        ({"size": 512.0}, "size must be an integer"),
        ({"clip_low_pct": -1}, "between 0 and 100"),
        ({"clip_low_pct": 99.5, "clip_high_pct": 0.5}, "must be below clip_high_pct"),
        ({"clahe_clip": 0}, "clahe_clip must be a positive number"),
        ({"clahe_tiles": 0}, "clahe_tiles must be an integer"),
        ({"output_dtype": "float32"}, "output_dtype must be one of"),
        ({"clahe": "yes"}, "clahe must be true or false"),
    ],
)
def test_params_reject_bad_values_with_a_hint(fields, hint):
    with pytest.raises(ValueError, match=hint):
        PreprocessParams(**fields)


# -- decoding: every shipped codec gives the same image as the uncompressed original --
@pytest.mark.parametrize(
    "variant",
    [
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_expb.dcm",
        "MR_small_implicit.dcm",
        "MR_small_padded.dcm",
    ],
)
def test_lossless_transfer_syntaxes_give_identical_output(variant):
    original = preprocess_file(pydicom_file("MR_small.dcm"))
    assert np.array_equal(preprocess_file(pydicom_file(variant)), original)


def _dcmcjpeg(source: str, target: Path, *options: str) -> Path:
    if shutil.which("dcmcjpeg") is None:
        pytest.skip("dcmtk's dcmcjpeg is not installed (scripts/setup.sh installs it)")
    subprocess.run(["dcmcjpeg", *options, source, str(target)], check=True, capture_output=True)
    return target


def test_jpeg_lossless_matches_original_or_says_which_decoder_is_missing(tmp_path):
    encoded = _dcmcjpeg(pydicom_file("MR_small.dcm"), tmp_path / "jpeg_ll.dcm", "+e1")
    has_decoder = any(importlib.util.find_spec(m) for m in ("libjpeg", "gdcm"))
    if has_decoder:
        assert np.array_equal(preprocess_file(encoded), preprocess_file(pydicom_file("MR_small.dcm")))
    else:
        with pytest.raises(DecodeError) as err:
            preprocess_file(encoded)
        assert err.value.reason == "no_decoder"
        assert "pylibjpeg-libjpeg" in str(err.value) or "libjpeg" in str(err.value)


def test_jpeg_baseline_is_close_to_original(tmp_path):
    encoded = _dcmcjpeg(pydicom_file("image_dfl.dcm"), tmp_path / "jpeg_baseline.dcm", "+eb", "+q", "95")
    assert pydicom.dcmread(encoded).file_meta.TransferSyntaxUID.keyword == "JPEGBaseline8Bit"
    lossy = preprocess_file(encoded).astype(int)
    original = preprocess_file(pydicom_file("image_dfl.dcm")).astype(int)
    assert np.abs(lossy - original).mean() < 2.0


@pytest.mark.parametrize(
    "name",
    [
        "693_J2KI.dcm",
        "JPEG2000.dcm",
        "JPEGLSNearLossless_16.dcm",
        "CT_small.dcm",
        "MR_small_RLE.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
        "rtdose.dcm",
        "MR_small.dcm",
    ],
)
def test_each_transfer_syntax_decodes_to_a_full_range_image(name):
    out = preprocess_file(pydicom_file(name))
    assert out.shape == (512, 512) and out.dtype == np.uint8
    assert out.max() == 255 and out.min() == 0


# -- modality LUT and photometric interpretation --
@pytest.mark.parametrize("name", [MONOCHROME1_CR, "CT_small.dcm", "693_J2KI.dcm", "rtdose.dcm"])
@pytest.mark.parametrize(("low", "high"), [(0.5, 99.5), (2.0, 90.0)])
def test_unit_image_matches_the_literal_recipe(name, low, high):
    ds = pydicom.dcmread(pydicom_file(name))
    unit = pixels_to_unit(ds, low, high)
    assert unit.dtype == np.float32 and unit.min() == 0.0 and unit.max() == 1.0
    np.testing.assert_allclose(unit, reference_unit(ds, low, high), atol=2e-6)


def test_clipping_a_known_array_gives_exact_values():
    # 0..200: numpy's linear 0.5th/99.5th percentiles fall exactly on order statistics 1 and 199
    pixels = np.arange(201, dtype=np.uint16).reshape(3, 67)
    unit = pixels_to_unit(image_dataset(pixels))
    expected = np.clip((pixels.astype(np.float64) - 1) / 198, 0, 1)
    np.testing.assert_allclose(unit, expected, atol=1e-7)
    assert unit.flat[0] == unit.flat[1] == 0.0 and unit.flat[199] == unit.flat[200] == 1.0
    assert unit.flat[100] == pytest.approx(0.5, abs=1e-7)
    # 10th/80th: position 20 and 160 → lo = 20, hi = 160
    np.testing.assert_allclose(
        pixels_to_unit(image_dataset(pixels), 10, 80),
        np.clip((pixels.astype(np.float64) - 20) / 140, 0, 1),
        atol=1e-7,
    )


def test_asymmetric_clip_applies_to_the_bone_bright_image():
    # MONOCHROME1 stored values: low values are bright. Clipping the darkest 20% of the *displayed*
    # image must clip the highest stored values.
    pixels = np.arange(201, dtype=np.uint16).reshape(3, 67)
    unit = pixels_to_unit(image_dataset(pixels, "MONOCHROME1"), 20, 100)
    displayed = 200 - pixels.astype(np.float64)  # lo = 40 (20th percentile of 0..200), hi = 200
    np.testing.assert_allclose(unit, np.clip((displayed - 40) / 160, 0, 1), atol=1e-7)


def test_monochrome1_and_monochrome2_of_the_same_anatomy_give_the_same_output():
    anatomy = ramp()  # brighter = more attenuation, as MONOCHROME2 stores it
    mono2 = image_dataset(anatomy, "MONOCHROME2", bits_stored=12)
    mono1 = image_dataset((4095 - anatomy).astype(np.uint16), "MONOCHROME1", bits_stored=12)
    out = preprocess_dataset(mono2)
    # identical up to float rounding: a pixel landing on a quantisation boundary may differ by one level
    difference = np.abs(preprocess_dataset(mono1).astype(int) - out)
    assert difference.max() <= 1 and (difference > 0).mean() < 1e-3
    assert out.max() == 255 and (out > 0).mean() > 0.5  # a real image, not a blank one


def test_monochrome1_is_inverted_so_the_output_mirrors_monochrome2():
    pixels = ramp()
    mono2 = pixels_to_unit(image_dataset(pixels, "MONOCHROME2", bits_stored=12))
    mono1 = pixels_to_unit(image_dataset(pixels, "MONOCHROME1", bits_stored=12))
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    assert mono2[-1, -1] > mono2[0, 0]  # sanity: the ramp is not symmetric, so mirroring is visible


def test_linear_rescale_keeps_the_image_and_a_negative_slope_mirrors_it():
    pixels = ramp()
    plain = pixels_to_unit(image_dataset(pixels))
    rescaled = image_dataset(pixels, RescaleSlope=0.684, RescaleIntercept=-1024)
    np.testing.assert_allclose(pixels_to_unit(rescaled), plain, atol=1e-6)
    np.testing.assert_allclose(pixels_to_unit(rescaled), reference_unit(rescaled), atol=2e-6)
    negative = image_dataset(pixels, RescaleSlope=-2, RescaleIntercept=100)
    np.testing.assert_allclose(pixels_to_unit(negative), 1.0 - plain, atol=1e-6)
    assert not pixels_to_unit(image_dataset(pixels, RescaleSlope=0, RescaleIntercept=5)).any()


def test_modality_lut_sequence_is_applied():
    pixels = ramp(scale=1) % 256
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 16]
    lut.ModalityLUTType = "US"
    lut.LUTData = (np.sqrt(np.arange(256)) * 1000).astype(np.uint16).tolist()
    ds = image_dataset(pixels.astype(np.uint8), ModalityLUTSequence=[lut])
    unit = pixels_to_unit(ds)
    np.testing.assert_allclose(unit, reference_unit(ds), atol=2e-6)
    assert (
        np.abs(unit - pixels_to_unit(image_dataset(pixels.astype(np.uint8)))).max() > 0.1
    )  # sqrt, not identity


# -- stored values: signed, garbage high bits, float, multi-frame --
def bundled_pydicom_files() -> list[Path]:
    # listed from disk: get_testdata_files would also try to download pydicom-data
    return sorted(p for p in Path(pydicom_file("CT_small.dcm")).parent.rglob("*") if p.is_file())


def test_stored_values_are_pydicoms_decode_on_every_pydicom_image():
    fast_path = []
    for path in bundled_pydicom_files():
        try:
            expected = decode_pixels(pydicom.dcmread(path), index=0)
        except Exception:  # not an image, or one pydicom cannot decode here
            continue
        ds = pydicom.dcmread(path)
        got = stored_values(ds)
        assert got.dtype == expected.dtype and np.array_equal(got, expected), path.name
        if ds.file_meta.TransferSyntaxUID in (
            ExplicitVRLittleEndian,
            ImplicitVRLittleEndian,
            RLELossless,
        ) and (ds.BitsAllocated in (8, 16) and ds.get("SamplesPerPixel", 1) == 1):
            fast_path.append(path.name)
    assert len(fast_path) >= 35
    assert {"CT_small.dcm", "MR_small_RLE.dcm", "MR_small_implicit.dcm"} <= set(fast_path)


@pytest.mark.parametrize("syntax", [ExplicitVRLittleEndian, RLELossless])
@pytest.mark.parametrize(
    ("signed", "bits_allocated", "bits_stored", "junk"),
    [
        (False, 16, 12, 0xA000),  # junk above the stored bits of unsigned values
        (False, 16, 12, 0),  # clean 12-bit values
        (True, 16, 12, 0),  # 12-bit two's complement, high bits zero: must be sign-extended
        (True, 16, 12, 0xC000),  # high bits neither zero nor copies of the sign bit
        (False, 16, 16, 0),
        (False, 8, 6, 0xC0),
        (True, 8, 6, 0),
    ],
)
def test_stored_values_mask_and_sign_extend_exactly_as_pydicom(
    syntax, signed, bits_allocated, bits_stored, junk
):
    unsigned = np.dtype(f"<u{bits_allocated // 8}")
    pattern = (np.random.default_rng(bits_stored).integers(0, 2**bits_stored, (31, 17)) | junk).astype(
        unsigned
    )
    ds = image_dataset(
        pattern.view(unsigned.str.replace("u", "i")) if signed else pattern, bits_stored=bits_stored
    )
    if syntax == RLELossless:
        ds.compress(RLELossless, encoding_plugin="pydicom")
    expected = decode_pixels(ds, index=0)
    got = stored_values(ds)
    assert got.dtype == expected.dtype and np.array_equal(got, expected)
    if junk or signed:  # pydicom's correction changed these values: the fast path must have too
        assert not np.array_equal(pattern, expected.view(unsigned))


def test_garbage_above_bits_stored_is_ignored():
    pixels = ramp()
    dirty = (pixels | np.uint16(0xA000)).astype("<u2").tobytes()  # 12 bits stored, junk in the top 4
    clean = preprocess_dataset(image_dataset(pixels, bits_stored=12))
    assert np.array_equal(preprocess_dataset(image_dataset(pixels, bits_stored=12, raw=dirty)), clean)


def test_signed_pixels_are_read_as_negative_values():
    signed = ramp().astype(np.int16) - 2000  # 12-bit signed range -2048..2047
    two_complement_12bit = (signed.astype(np.uint16) & 0x0FFF).astype("<u2").tobytes()
    ds = image_dataset(signed, bits_stored=12, signed=True, raw=two_complement_12bit)
    assert ds.pixel_array.min() < 0
    # read as unsigned, the negative half would wrap to the top of the range and the image would tear
    shifted = image_dataset((signed + 2048).astype(np.uint16), bits_stored=12)
    np.testing.assert_allclose(pixels_to_unit(ds), pixels_to_unit(shifted), atol=1e-6)
    assert np.abs(preprocess_dataset(ds).astype(int) - preprocess_dataset(shifted)).max() <= 1


def test_huge_float_values_do_not_overflow():
    pixels = (ramp().astype(np.float64) - 2000) * 1e304  # ±2e307: far beyond float32, near float64's edge
    ds = image_dataset(np.zeros(pixels.shape, np.float32))
    del ds.FloatPixelData
    ds.BitsAllocated = 64
    ds.DoubleFloatPixelData = pixels.astype("<f8").tobytes()
    unit = pixels_to_unit(ds)
    assert np.isfinite(unit).all() and unit.min() == 0.0 and unit.max() == 1.0
    np.testing.assert_allclose(unit, pixels_to_unit(image_dataset(ramp())), atol=1e-6)


def test_pixel_padding_is_left_out_of_the_percentiles_and_black():
    anatomy = ramp()
    padded = anatomy.copy()
    padded[:, :10] = 4095  # a third of the frame outside the collimated field, stored as white in MONOCHROME1
    ds = image_dataset(padded, "MONOCHROME1", bits_stored=12, PixelPaddingValue=4095)
    unit = pixels_to_unit(ds)
    assert not unit[:, :10].any()
    field = image_dataset(anatomy[:, 10:], "MONOCHROME1", bits_stored=12)
    np.testing.assert_allclose(unit[:, 10:], pixels_to_unit(field), atol=1e-6)


# -- the fused 8/16-bit integer path against the float recipe, step by step --
def float_recipe(ds: Dataset, params: PreprocessParams) -> np.ndarray:
    """Steps 4–6 on a full-size float32 [0, 1] image: what the fused uint16 path must reproduce."""
    return quantize(resize_pad(pixels_to_unit(ds), params.size), params.output_dtype)


def assert_within_one_grey_level(fast: np.ndarray, reference: np.ndarray) -> None:
    assert fast.dtype == reference.dtype and fast.shape == reference.shape
    difference = np.abs(fast.astype(np.int64) - reference)
    assert difference.max() <= 1
    if fast.dtype == np.uint8:  # the uint16 intermediate is 257× finer: only exact rounding ties move
        assert (difference > 0).mean() < 0.01


@pytest.mark.parametrize("output_dtype", ["uint8", "uint16"])
def test_fused_path_matches_the_float_recipe_on_every_pydicom_image(output_dtype):
    params = PreprocessParams(output_dtype=output_dtype)
    compared = []
    for path in bundled_pydicom_files():
        try:
            ds = pydicom.dcmread(path)
            reference = float_recipe(ds, params)
        except Exception:  # not an image, or one the typed-error tests cover
            continue
        assert_within_one_grey_level(preprocess_dataset(ds, params), reference)
        compared.append(path.name)
    assert len(compared) >= 30
    assert {"CT_small.dcm", "MR_small_RLE.dcm", "693_J2KI.dcm", "6154"} <= set(compared)


@pytest.mark.parametrize("output_dtype", ["uint8", "uint16"])
@pytest.mark.parametrize("photometric", ["MONOCHROME1", "MONOCHROME2"])
@pytest.mark.parametrize(
    ("bits", "signed", "rescale"),
    [
        (12, False, {}),
        (12, False, {"RescaleSlope": 0.684, "RescaleIntercept": -1024}),
        (12, False, {"RescaleSlope": -2, "RescaleIntercept": 100}),
        (12, True, {"RescaleSlope": 1, "RescaleIntercept": -1024}),
        (16, False, {}),
        (16, True, {"RescaleSlope": -0.5, "RescaleIntercept": 0}),
        (8, False, {}),
    ],
)
def test_fused_path_matches_the_float_recipe_on_synthetic_radiographs(
    output_dtype, photometric, bits, signed, rescale
):
    stored = textured_pixels(bits=bits)
    if signed:
        stored = (stored.astype(np.int32) - 2 ** (bits - 1)).astype(np.int16)
    ds = image_dataset(stored, photometric, bits_stored=bits, **rescale)
    params = PreprocessParams(size=128, output_dtype=output_dtype)
    assert_within_one_grey_level(preprocess_dataset(ds, params), float_recipe(ds, params))


def test_fused_path_keeps_padding_black_like_the_float_recipe():
    stored = textured_pixels()
    stored[:, :50] = 4095
    ds = image_dataset(stored, "MONOCHROME1", bits_stored=12, PixelPaddingValue=4095)
    params = PreprocessParams(size=128)
    out = preprocess_dataset(ds, params)
    assert_within_one_grey_level(out, float_recipe(ds, params))
    assert not out[:, 10:20].any()  # the padded band, resized into the left of the 128-wide frame


def test_float_pixel_data_is_preprocessed_like_the_same_array():
    pixels = ramp().astype(np.float32) / 7.5 - 100.0
    assert np.array_equal(preprocess_dataset(image_dataset(pixels)), preprocess_array(pixels))


def test_non_finite_float_pixels_are_a_decode_error():
    pixels = ramp().astype(np.float32)
    pixels[3, 3] = np.nan
    with pytest.raises(DecodeError) as err:
        preprocess_dataset(image_dataset(pixels))
    assert err.value.reason == "non_finite"


def test_multi_frame_uses_the_first_frame():
    frames = np.stack([ramp(), ramp()[::-1], ramp()[:, ::-1]])
    assert np.array_equal(
        preprocess_dataset(image_dataset(frames)), preprocess_dataset(image_dataset(frames[0]))
    )
    assert np.array_equal(
        preprocess_file(pydicom_file("rtdose.dcm")), preprocess_file(pydicom_file("rtdose_1frame.dcm"))
    )


# -- step 4: percentiles --
@pytest.mark.parametrize("dtype", [np.uint8, np.int8, np.uint16, np.int16, np.int32, np.float32])
@pytest.mark.parametrize("size", [1, 2, 7, 10_001])
def test_percentiles_equal_numpys_linear_definition(dtype, size):
    rng = np.random.default_rng(size)
    info = np.iinfo(dtype) if np.issubdtype(dtype, np.integer) else None
    if info is not None:
        values = rng.integers(info.min, info.max, size=size, endpoint=True, dtype=dtype)
    else:
        values = (rng.normal(size=size) * 100).astype(dtype)
    for low, high in [(0.5, 99.5), (0, 100), (2.5, 50), (33.3, 66.7)]:
        expected = np.percentile(values, [low, high])
        assert percentiles(values, low, high) == pytest.approx(tuple(expected), rel=1e-12, abs=1e-12)


def test_an_outlier_pixel_does_not_compress_the_range():
    pixels = np.arange(100 * 100, dtype=np.uint16).reshape(100, 100) % 1000
    pixels[50, 50] = 65535  # one hot pixel, e.g. a dead detector element
    unit = pixels_to_unit(image_dataset(pixels))
    assert unit[50, 50] == 1.0
    body = np.delete(unit.ravel(), 50 * 100 + 50)
    # min-max without clipping would squeeze the whole image into [0, 0.015]
    assert np.percentile(body, 99) > 0.98 and np.percentile(body, 1) < 0.02


def test_constant_image_gives_zeros_not_nan():
    flat = np.full((20, 30), 1234, np.uint16)
    assert not np.isnan(pixels_to_unit(image_dataset(flat))).any()
    assert not preprocess_dataset(image_dataset(flat)).any()
    assert not preprocess_array(np.full((20, 30), 0.25, np.float32)).any()


# -- step 5: geometry --
@pytest.mark.parametrize(
    ("shape", "content", "offset"),
    [
        ((100, 50), (512, 256), (0, 128)),  # tall: full height, centred horizontally
        ((50, 100), (256, 512), (128, 0)),  # wide: full width, centred vertically
        ((30, 31), (495, 512), (8, 0)),  # odd remainder (17 rows): 8 above, 9 below
    ],
)
def test_resize_keeps_aspect_ratio_and_pads_centred(shape, content, offset):
    out = resize_pad(np.ones(shape, np.float32), 512)
    assert out.shape == (512, 512)
    rows, cols = np.nonzero(out > 0.5)
    assert (rows.min(), cols.min()) == offset
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == content
    assert not out[: offset[0]].any() and not out[:, : offset[1]].any()


@pytest.mark.parametrize(("size", "dtype"), [(512, "uint8"), (224, "uint16"), (513, "uint8")])
def test_output_is_exactly_size_by_size(size, dtype):
    out = preprocess_file(pydicom_file("JPEG2000.dcm"), PreprocessParams(size=size, output_dtype=dtype))
    assert out.shape == (size, size) and out.dtype == np.dtype(dtype)
    assert out.max() == np.iinfo(dtype).max


# -- step 6: CLAHE and PNG --
def test_clahe_is_applied_last_on_the_padded_image():
    plain = preprocess_file(pydicom_file("693_J2KI.dcm"))
    with_clahe = preprocess_file(pydicom_file("693_J2KI.dcm"), PreprocessParams(clahe=True))
    assert np.array_equal(with_clahe, apply_clahe(plain, 2.0, 8))
    assert not np.array_equal(with_clahe, plain)
    with pytest.raises(ValueError, match="uint8 or uint16"):
        apply_clahe(plain.astype(np.float32))


@pytest.mark.parametrize("dtype", [np.uint8, np.uint16])
@pytest.mark.parametrize(
    ("shape", "pillow_mode"),
    [((64, 48), "L"), ((1, 1), "L"), ((1, 7), "L"), ((5, 1), "L"), ((33, 17), "L"), ((9, 5, 3), "RGB")],
)
def test_png_encoding_is_lossless_for_opencv_and_pillow(dtype, shape, pillow_mode):
    img = np.random.default_rng(0).integers(0, np.iinfo(dtype).max, shape, dtype=dtype, endpoint=True)
    data = encode_png(img)
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.dtype == dtype and np.array_equal(decoded, img)
    with Image.open(io.BytesIO(data)) as png:
        png.verify()  # chunk CRCs and structure
    if dtype == np.uint16 and pillow_mode == "RGB":
        return  # Pillow reads 16-bit colour only as 8 bits
    with Image.open(io.BytesIO(data)) as png:
        assert png.size == shape[1::-1] and png.mode == (pillow_mode if dtype == np.uint8 else "I;16")
        rgb_as_bgr = np.asarray(png)[..., ::-1] if pillow_mode == "RGB" else np.asarray(png)
        assert np.array_equal(rgb_as_bgr, img)


def test_png_encoding_keeps_the_alpha_channel_of_bgra():
    bgra = np.random.default_rng(1).integers(0, 255, (6, 4, 4), dtype=np.uint8)
    decoded = cv2.imdecode(np.frombuffer(encode_png(bgra), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, bgra)
    with Image.open(io.BytesIO(encode_png(bgra))) as png:
        assert png.mode == "RGBA" and np.array_equal(np.asarray(png), bgra[..., [2, 1, 0, 3]])


def test_png_encoding_takes_views_and_compresses_radiographs():
    img = preprocess_file(pydicom_file("CT_small.dcm"), PreprocessParams(size=256))
    flipped = img[::-1, ::2]  # not contiguous
    decoded = cv2.imdecode(np.frombuffer(encode_png(flipped), np.uint8), cv2.IMREAD_UNCHANGED)
    assert np.array_equal(decoded, flipped)
    assert len(encode_png(img)) < 0.7 * img.nbytes


@pytest.mark.parametrize(
    "img", [np.zeros((4, 4), np.float32), np.zeros((4, 4, 2), np.uint8), np.zeros((0, 4), np.uint8)]
)
def test_png_encoding_refuses_what_is_not_an_image(img):
    with pytest.raises(ValueError, match="uint8 or uint16 image, H×W grey or H×W×3/4 BGR"):
        encode_png(img)


# -- display-oriented arrays (PNG/JPEG inputs) --
def test_preprocess_array_treats_rgb_encoded_grayscale_like_grayscale():
    gray = (ramp() % 256).astype(np.uint8)
    bgr = np.repeat(gray[:, :, None], 3, axis=2)
    assert np.array_equal(preprocess_array(bgr), preprocess_array(gray))
    assert np.array_equal(preprocess_array(gray[:, :, None]), preprocess_array(gray))
    with pytest.raises(PreprocessError) as err:
        preprocess_array(np.zeros((4, 4, 2), np.uint8))
    assert err.value.reason == "bad_array"


# -- typed errors with a reason for everything that is not a usable grayscale image --
@pytest.mark.parametrize(
    ("name", "error", "reason", "detail"),
    [
        ("rtplan.dcm", NoPixelData, "no_pixel_data", "no Pixel Data"),
        ("test-SR.dcm", NoPixelData, "no_pixel_data", "no Pixel Data"),
        ("waveform_ecg.dcm", NoPixelData, "no_pixel_data", "no Pixel Data"),
        ("no_meta.dcm", PreprocessError, "not_dicom", "not a DICOM file"),
        ("rtstruct.dcm", PreprocessError, "not_dicom", "not a DICOM file"),
        ("MR_truncated.dcm", DecodeError, "truncated", "less than expected"),
        ("badVR.dcm", DecodeError, "invalid_header", "not a number"),
        ("meta_missing_tsyntax.dcm", DecodeError, "invalid_header", "PhotometricInterpretation"),
        (
            "JPEG-lossy.dcm",
            DecodeError,
            "decode_error",
            "JPEGExtended12Bit",
        ),  # a known-corrupt 12-bit JPEG stream
        ("JPEG2000-embedded-sequence-delimiter.dcm", DecodeError, "decode_error", "JPEG2000"),
        ("SC_rgb_rle.dcm", UnsupportedPhotometric, "unsupported_photometric", "RGB"),
        ("SC_rgb_jpeg_dcmtk.dcm", UnsupportedPhotometric, "unsupported_photometric", "YBR_FULL"),
        ("examples_ybr_color.dcm", UnsupportedPhotometric, "unsupported_photometric", "YBR_FULL_422"),
        ("GDCMJ2K_TextGBR.dcm", UnsupportedPhotometric, "unsupported_photometric", "YBR_RCT"),
        ("examples_palette.dcm", UnsupportedPhotometric, "unsupported_photometric", "PALETTE COLOR"),
    ],
)
def test_unusable_files_raise_a_typed_error_with_a_reason(name, error, reason, detail):
    with pytest.raises(error) as err:
        preprocess_file(pydicom_file(name))
    assert isinstance(err.value, PreprocessError) and isinstance(err.value, ValueError)
    assert err.value.reason == reason and reason in REASONS
    assert detail in str(err.value)  # the message says what is wrong, not just a code


@pytest.mark.parametrize("keep", [0.5, 0.1])  # cut inside the pixel data; cut inside the header
def test_truncated_copy_of_a_file_is_reported_as_truncated(tmp_path, keep):
    data = Path(pydicom_file("CT_small.dcm")).read_bytes()
    cut = tmp_path / "CT_small_cut.dcm"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PreprocessError) as err:
        preprocess_file(cut)
    assert err.value.reason == "truncated"


@pytest.mark.parametrize("content", [b"", b"not a dicom file\n" * 100, bytes(range(256)) * 40])
def test_non_dicom_bytes_are_reported_as_not_dicom(tmp_path, content):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(content)
    with pytest.raises(PreprocessError) as err:
        preprocess_file(junk)
    assert err.value.reason == "not_dicom"


def test_truncated_jpeg2000_codestream_is_a_decode_error():
    ds = pydicom.dcmread(pydicom_file("MR_small_jp2klossless.dcm"))
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([frame[: len(frame) // 3]])
    with pytest.raises(DecodeError) as err:
        preprocess_dataset(ds)
    assert err.value.reason == "decode_error"


def test_missing_file_is_an_os_error_not_a_quarantine_reason(tmp_path):
    with pytest.raises(FileNotFoundError):
        preprocess_file(tmp_path / "absent.dcm")


# -- CLI --
def test_preview_cli_writes_a_512_png(tmp_path, capsys):
    out = tmp_path / "preview" / "cr.png"
    assert main([pydicom_file(MONOCHROME1_CR), "--out", str(out), "--clahe"]) == 0
    img = cv2.imread(str(out), cv2.IMREAD_UNCHANGED)
    assert img.shape == (512, 512) and img.dtype == np.uint8
    assert "wrote" in capsys.readouterr().out
    assert [p.name for p in out.parent.iterdir()] == ["cr.png"]  # no temp file left behind


def test_preview_cli_reports_unusable_input_with_its_reason(tmp_path, capsys):
    assert main([pydicom_file("SC_rgb_rle.dcm"), "--out", str(tmp_path / "x.png")]) == 1
    err = capsys.readouterr().err
    assert "unsupported_photometric" in err and "RGB" in err and "SC_rgb_rle.dcm" in err
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(SystemExit):
        main([pydicom_file("MR_small.dcm"), "--out", str(tmp_path / "x.png"), "--size", "4"])


def test_preview_cli_accepts_png_input(tmp_path):
    source = tmp_path / "in.png"
    cv2.imwrite(str(source), (ramp() % 256).astype(np.uint8))
    assert main([str(source), "--out", str(tmp_path / "out.png"), "--size", "128"]) == 0
    assert cv2.imread(str(tmp_path / "out.png"), cv2.IMREAD_UNCHANGED).shape == (128, 128)


def _preview(*args: str) -> subprocess.CompletedProcess:
    """The documented command, as a user runs it."""
    return subprocess.run(
        [sys.executable, "-m", "ingest", "preview", *args],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )


def test_python_m_ingest_preview_writes_a_png_that_reads_back(tmp_path):
    out = tmp_path / "rtdose.png"
    result = _preview(pydicom_file("rtdose.dcm"), "--out", str(out), "--size", "256")
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (256, 256)


def test_python_m_ingest_preview_fails_clearly_on_a_bad_file(tmp_path):
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"this is not DICOM" * 50)
    result = _preview(str(junk), "--out", str(tmp_path / "junk.png"))
    assert result.returncode == 1
    assert all(text in result.stderr for text in ("junk.dcm", "not a DICOM file", "not_dicom"))
    assert not (tmp_path / "junk.png").exists()
