"""H.264 MP4 (yuv420p, faststart) and a WebP thumbnail, written with PyAV and Pillow."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import tempfile
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from av.video.reformatter import Colorspace
from PIL import Image

from wanserve.errors import InvalidRequest

log = logging.getLogger(__name__)

# x264's CPU flag for its AVX-512 code paths (x264.h, unchanged since build 152).
_X264_CPU_AVX512 = 1 << 16
# FFmpeg's AVCOL_SPC/PRI/TRC_BT709 and AVCOL_RANGE_MPEG.
_BT709, _LIMITED_RANGE = 1, 1


def thumbnail_path_for(video_path: Path) -> Path:
    return video_path.with_suffix(".webp")


def check_output_path(out: Path) -> None:
    """Refuse, before any work, a path that could not hold the video and its thumbnail (the error's field is
    `out_path`; the CLI calls it `--out`). Creates the missing folders."""
    if not out.name or out.name in (".", ".."):
        # An empty path reads as '.': said as what the user may have typed.
        given = "an empty path or '.'" if str(out) == "." else repr(str(out))
        raise InvalidRequest("out_path", f"{given} names no file: give the MP4's path, such as fox.mp4")
    thumbnail = thumbnail_path_for(out)
    # Any case: on a case-insensitive disk (macOS, Windows) fox.WEBP and fox.webp are one file, the video lost.
    if out.suffix.lower() == thumbnail.suffix:
        raise InvalidRequest(
            "out_path", f"the thumbnail is written beside the video as {out.stem}.webp; name the video {out.stem}.mp4"
        )
    for path in (out, thumbnail):
        if path.exists() and not path.is_file():
            raise InvalidRequest("out_path", f"{path} exists and is not a regular file")
    # An MP4 written as fox.gif or fox.avi opens in nothing that goes by the name.
    if out.suffix.lower() != ".mp4":
        given = f"ends in {out.suffix!r}" if out.suffix else "has no extension"
        raise InvalidRequest(
            "out_path", f"must end in .mp4 (the video is written as MP4), {given}: name it {out.stem}.mp4"
        )
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidRequest("out_path", f"cannot create the folder {out.parent}: {exc.strerror or exc}") from None
    # Trying is the only true test: os.access says yes to root everywhere, /proc and read-only mounts included.
    try:
        with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", suffix=".probe"):
            pass
    except OSError as exc:
        raise InvalidRequest("out_path", f"cannot write in the folder {out.parent}: {exc.strerror or exc}") from None


def write_mp4(frames: np.ndarray, path: Path, fps: int, crf: int = 18) -> Path:
    """Encode uint8 frames shaped (T, H, W, 3). Written to a temporary name, then renamed into place,
    so a reader never sees half a file and a re-run overwrites instead of duplicating."""
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"frames must be uint8 (T, H, W, 3), got {frames.dtype} {frames.shape}")
    _, height, width, _ = frames.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as container:
            stream = container.add_stream("libx264", rate=Fraction(fps))
            stream.width = width
            stream.height = height
            stream.pix_fmt = "yuv420p"
            # Converted with the BT.709 matrix and tagged so (limited range): untagged, players guess by size,
            # and swscale's default BT.601 played back as BT.709 at 720p and up shifts every colour.
            codec = stream.codec_context
            codec.colorspace = codec.color_primaries = codec.color_trc = _BT709
            codec.color_range = _LIMITED_RANGE
            stream.options = {"crf": str(crf), "preset": "medium", **_x264_options()}
            for frame in frames:
                yuv = av.VideoFrame.from_ndarray(frame, format="rgb24").reformat(
                    format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=_LIMITED_RANGE
                )
                for packet in stream.encode(yuv):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


@functools.cache
def _x264_options() -> dict[str, str]:
    """Keep libx264 off its AVX-512 code paths, and on every other SIMD path it detects.

    With them, the x264 that PyAV bundles (build 165) encodes the same frames into different bitstreams from
    one run to the next on AVX-512 CPUs (its macroblock-tree rate control): the same seed gave a different
    MP4. Without them every run gives the bitstream that x264's plain C code gives. The flags come from x264's
    own `x264_cpu_detect`, called through ctypes on the library libavcodec loaded; where that library cannot
    be found (another PyAV build), x264 keeps its defaults.
    """
    path = _bundled_x264()
    if path is None:
        return {}
    try:
        detect = ctypes.CDLL(str(path)).x264_cpu_detect
        detect.restype = ctypes.c_uint32
        flags = int(detect())
    except (OSError, AttributeError) as exc:
        log.debug("libx264 CPU flags unavailable (%s); x264 keeps its defaults", exc)
        return {}
    if not flags & _X264_CPU_AVX512:
        return {}
    return {"x264-params": f"asm={flags & ~_X264_CPU_AVX512}"}


def _bundled_x264() -> Path | None:
    """PyAV's own libx264 (`av.libs/libx264-<hash>.so.<build>`), when it is build 152 or newer."""
    libs = Path(av.__file__).resolve().parent.parent / "av.libs"
    for candidate in sorted(libs.glob("libx264*.so.*")):
        build = re.search(r"\.so\.(\d+)$", candidate.name)
        if build and int(build.group(1)) >= 152:
            return candidate
    return None


def write_thumbnail(frames: np.ndarray, path: Path, max_side: int = 512) -> Path:
    """The middle frame as WebP (the format OpenAI's `variant=thumbnail` returns)."""
    image = Image.fromarray(frames[len(frames) // 2])
    image.thumbnail((max_side, max_side))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        image.save(tmp, format="WEBP", quality=85)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
