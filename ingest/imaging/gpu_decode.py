"""JPEG 2000 / HTJ2K frames decoded on the GPU with nVIDIA's nvImageCodec (``--decode gpu``).

nvImageCodec (``pip install nvidia-nvimgcodec-cu13``) decodes a batch of codestreams with nvJPEG2000 on
a CUDA device, at full resolution; the paper's steps then run on the CPU as for any decode. Where the
package or a CUDA device is missing, the commands refuse ``--decode gpu`` with what to install, or, with
``--gpu-fallback cpu``, log why and decode on the CPU instead (and record that in the shard manifest).
"""

from __future__ import annotations

import logging
from dataclasses import replace

import numpy as np

log = logging.getLogger(__name__)
GPU_FALLBACKS = ("refuse", "cpu")  # without CUDA: refuse --decode gpu, or decode on the CPU instead
_INSTALL = "install nvidia-nvimgcodec-cu13 on a machine with a CUDA GPU"


class GpuDecodeUnavailable(ValueError):
    """``--decode gpu`` was asked for where nvImageCodec or a CUDA device is missing."""


def unavailable_reason() -> str | None:
    """Why the GPU decoder cannot run here, or None when it can."""
    try:
        from nvidia import nvimgcodec  # noqa: F401
    except ImportError:
        return "nvImageCodec is not installed"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA device is visible (torch.cuda.is_available() is False)"
    return None


def resolve_gpu_decode(params, fallback: str = "refuse"):
    """``params`` as it will really run: unchanged unless it asks for the GPU decoder where none can
    run, then refused (``fallback="refuse"``) or switched to the CPU's full decode (``"cpu"``)."""
    if fallback not in GPU_FALLBACKS:
        raise ValueError(f"gpu fallback must be one of {GPU_FALLBACKS}, got {fallback!r}")
    if params.decode != "gpu":
        return params
    reason = unavailable_reason()
    if reason is None:
        return params
    if fallback == "refuse":
        raise GpuDecodeUnavailable(
            f"--decode gpu: {reason}; {_INSTALL}, or pass --gpu-fallback cpu to decode on the CPU"
        )
    log.warning("--decode gpu: %s; decoding on the CPU at full resolution instead", reason)
    return replace(params, decode="full")


_decoder = None  # one nvImageCodec decoder per process: it holds CUDA streams and pinned buffers


def decode_frames(codestreams: list[bytes]) -> list[np.ndarray]:
    """Decode a batch of JPEG 2000 / HTJ2K codestreams on the GPU; host arrays at the stored bit depth."""
    global _decoder
    from nvidia import nvimgcodec

    if _decoder is None:
        _decoder = nvimgcodec.Decoder()
    params = nvimgcodec.DecodeParams(allow_any_depth=True, color_spec=nvimgcodec.ColorSpec.UNCHANGED)
    images = _decoder.decode(codestreams, params=params)
    return [np.asarray(image.cpu()).squeeze() for image in images]
