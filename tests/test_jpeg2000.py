"""Reduced-resolution JPEG 2000 / HTJ2K decoding (ingest/imaging/jpeg2000.py) against the full decode."""

from __future__ import annotations

import logging
import subprocess
import sys

import cv2
import numpy as np
import pydicom
import pytest
from factories import radiograph, write
from openjpeg.utils import encode_array
from pydicom.encaps import encapsulate
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000, HTJ2KLossless, JPEG2000Lossless

from ingest.imaging.gpu_decode import GpuDecodeUnavailable, resolve_gpu_decode, unavailable_reason
from ingest.imaging.jpeg2000 import (
    ReducedDecodeError,
    codestream_levels,
    decode_on_gpu,
    decode_reduced,
    first_frame_codestream,
    reduction_for,
)
from ingest.imaging.preprocess import PreprocessParams, preprocess_dataset
from ingest.phantoms.dicom import encode

ODD_SHAPE = (1101, 837)  # odd on both sides: the pyramid's ceil(n / 2**r) rounding matters


def smooth_radiograph(shape=ODD_SHAPE, key="j2k") -> pydicom.Dataset:
    """The test factory's radiograph (gradient, disc, mild noise), at a size worth reducing."""
    return radiograph(patient_id="P1", study_key=key, shape=shape)


def compressed(ds: pydicom.Dataset, syntax, **kwargs) -> pydicom.Dataset:
    pixels = pixel_array(ds)
    if syntax == HTJ2KLossless:
        encode(ds, pixels, str(syntax))  # the phantoms' HTJ2K writer (OpenJPH through imagecodecs)
    else:
        ds.compress(syntax, pixels, generate_instance_uid=False, **kwargs)
    return ds


def difference(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean absolute difference, PSNR in dB) of two uint8 images."""
    error = a.astype(np.float64) - b
    mse = float(np.mean(error**2))
    return float(np.mean(np.abs(error))), (np.inf if mse == 0 else 10 * np.log10(255**2 / mse))


def test_reduction_is_the_largest_whose_long_side_still_covers_the_size():
    assert reduction_for(2500, 2000, 512, levels=5) == 2  # 625 ≥ 512 > 313
    assert reduction_for(1101, 837, 256, levels=5) == 2  # ceil(1101 / 4) = 276 ≥ 256
    assert reduction_for(1101, 837, 276, levels=5) == 2 and reduction_for(1101, 837, 277, levels=5) == 1
    assert reduction_for(4000, 4000, 64, levels=3) == 3  # never past the codestream's levels
    assert reduction_for(500, 400, 512, levels=5) == 0  # already smaller than the output


@pytest.mark.parametrize(
    "syntax, kwargs",
    [(JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [10]}), (HTJ2KLossless, {})],
    ids=["jpeg2000-lossless", "jpeg2000-lossy", "htj2k-lossless"],
)
def test_reduced_decode_has_the_pyramid_level_shape_and_the_full_decodes_content(syntax, kwargs):
    ds = compressed(smooth_radiograph(), syntax, **kwargs)
    rows, columns, levels = codestream_levels(first_frame_codestream(ds))
    assert (rows, columns) == ODD_SHAPE and levels >= 2
    reduced = decode_reduced(ds, 256)
    assert reduced.shape == (276, 210) and reduced.dtype == np.uint16
    full = pixel_array(ds).astype(np.float32)
    area = cv2.resize(full, (210, 276), interpolation=cv2.INTER_AREA)
    # the wavelet low band, phase-aligned to the blocks, is a low-passed image, not a box average: close
    assert np.mean(np.abs(reduced - area)) < 0.005 * (full.max() - full.min())


@pytest.mark.parametrize(
    "syntax, kwargs",
    [(JPEG2000Lossless, {}), (JPEG2000, {"j2k_cr": [10]}), (HTJ2KLossless, {})],
    ids=["jpeg2000-lossless", "jpeg2000-lossy", "htj2k-lossless"],
)
def test_reduced_preprocessing_matches_the_full_resolution_path(syntax, kwargs):
    ds = compressed(smooth_radiograph(), syntax, **kwargs)
    notes: list[str] = []
    reduced = preprocess_dataset(ds, PreprocessParams(size=256, decode="reduced"), notes)
    full = preprocess_dataset(ds, PreprocessParams(size=256, decode="full"))
    mad, psnr = difference(reduced, full)
    assert reduced.shape == full.shape == (256, 256) and not notes
    assert mad <= 1.0 and psnr >= 45, (mad, psnr)  # the goal for the reduced path


def test_reduced_decode_puts_structure_where_the_full_path_puts_it():
    # Anatomy-like structure varying over ~50 px: a reduced frame left at the wavelet's sample phase
    # moves everything by 1.5 full-size pixels at r = 2 (a mean difference of 3 grey levels here).
    rng = np.random.default_rng(5)
    coarse = rng.random((26, 22)).astype(np.float32)
    field = cv2.resize(coarse, (1000, 1200), interpolation=cv2.INTER_CUBIC)
    ds = smooth_radiograph(shape=(1200, 1000), key="field")
    ds.PixelData = np.clip(field * 3000 + 500, 0, 4095).astype(np.uint16).tobytes()
    ds = compressed(ds, JPEG2000Lossless)
    reduced = preprocess_dataset(ds, PreprocessParams(size=256, decode="reduced"))
    full = preprocess_dataset(ds, PreprocessParams(size=256, decode="full"))
    mad, psnr = difference(reduced, full)
    assert mad <= 0.5 and psnr >= 50, (mad, psnr)


def test_a_frame_already_smaller_than_the_output_is_decoded_in_full():
    ds = compressed(smooth_radiograph(shape=(300, 240)), JPEG2000Lossless)
    assert decode_reduced(ds, 256) is None
    params = PreprocessParams(size=256)
    assert np.array_equal(
        preprocess_dataset(ds, params.__class__(size=256, decode="reduced")), preprocess_dataset(ds, params)
    )


def test_a_frame_the_reduced_decoder_cannot_read_falls_back_to_the_full_decode(caplog):
    """Some writers wrap the codestream in a JP2 file: pydicom decodes it, the reduced path refuses it."""
    ds = smooth_radiograph(key="jp2")
    pixels = pixel_array(ds)
    jp2 = encode_array(pixels, bits_stored=12, photometric_interpretation=2, use_mct=False, codec_format=1)
    ds.PixelData = encapsulate([jp2])
    ds["PixelData"].VR = "OB"
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    with pytest.raises(ReducedDecodeError) as refused:
        decode_reduced(ds, 256)
    assert refused.value.reason == "not_codestream"
    notes: list[str] = []
    with caplog.at_level(logging.WARNING, logger="ingest.imaging.preprocess"):
        out = preprocess_dataset(ds, PreprocessParams(size=256, decode="reduced"), notes)
    assert notes == ["reduced_decode_fallback:not_codestream"]
    assert "full decode instead" in caplog.text
    assert np.array_equal(out, preprocess_dataset(ds, PreprocessParams(size=256)))


def test_htj2k_phantom_round_trips_losslessly(tmp_path):
    ds = smooth_radiograph(key="htj2k")
    pixels = pixel_array(ds).copy()
    encode(ds, pixels, str(HTJ2KLossless))
    path = write(ds, tmp_path)
    back = pydicom.dcmread(path)
    assert back.file_meta.TransferSyntaxUID == HTJ2KLossless
    assert np.array_equal(pixel_array(back), pixels)


def test_decode_mode_is_validated_and_recorded_with_the_parameters():
    assert PreprocessParams(decode="reduced").to_dict()["decode"] == "reduced"
    assert PreprocessParams().decode == "full"  # shard sets made before the option read as full decodes
    with pytest.raises(ValueError, match="decode must be one of"):
        PreprocessParams(decode="fast")


def test_preview_decodes_reduced_on_request(tmp_path):
    path = write(compressed(smooth_radiograph(key="cli"), JPEG2000Lossless), tmp_path)
    out = tmp_path / "preview.png"
    result = subprocess.run(
        [sys.executable, "-m", "ingest", "preview", str(path), "--out", str(out), "--size", "256"]
        + ["--decode", "reduced", "--decoder-threads", "2"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert cv2.imread(str(out), cv2.IMREAD_UNCHANGED).shape == (256, 256)


needs_no_gpu_decoder = pytest.mark.skipif(
    unavailable_reason() is None, reason="nvImageCodec and a CUDA device are present: nothing to refuse"
)


@needs_no_gpu_decoder
def test_gpu_decode_is_refused_without_cuda_with_what_to_install():
    with pytest.raises(GpuDecodeUnavailable, match="nvidia-nvimgcodec-cu13.*--gpu-fallback cpu"):
        resolve_gpu_decode(PreprocessParams(decode="gpu"))


@needs_no_gpu_decoder
def test_gpu_decode_falls_back_to_the_cpu_when_configured_and_says_so(caplog):
    with caplog.at_level(logging.WARNING, logger="ingest.imaging.gpu_decode"):
        params = resolve_gpu_decode(PreprocessParams(size=256, decode="gpu"), fallback="cpu")
    assert params == PreprocessParams(size=256, decode="full")  # what the manifest then records
    assert "decoding on the CPU" in caplog.text


@needs_no_gpu_decoder
def test_preview_refuses_gpu_decode_without_cuda_unless_told_to_fall_back(tmp_path):
    path = write(compressed(smooth_radiograph(key="gpu"), JPEG2000Lossless), tmp_path)
    command = [sys.executable, "-m", "ingest", "preview", str(path), "--out", str(tmp_path / "p.png")]
    refused = subprocess.run(command + ["--decode", "gpu"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "nvidia-nvimgcodec-cu13" in refused.stderr
    assert not (tmp_path / "p.png").exists()
    fallback = command + ["--decode", "gpu", "--gpu-fallback", "cpu"]
    assert subprocess.run(fallback, capture_output=True, timeout=120).returncode == 0


@pytest.mark.gpu
def test_gpu_decode_equals_the_cpu_decode():
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    for syntax in (JPEG2000Lossless, HTJ2KLossless):
        ds = compressed(smooth_radiograph(key=f"gpu-{syntax}"), syntax)
        assert np.array_equal(decode_on_gpu(ds), pixel_array(ds))
