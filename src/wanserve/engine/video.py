"""H.264 MP4 (yuv420p, faststart) and a WebP thumbnail, written with PyAV and Pillow."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image


def thumbnail_path_for(video_path: Path) -> Path:
    return video_path.with_suffix(".webp")


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
            stream.options = {"crf": str(crf), "preset": "medium"}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_thumbnail(frames: np.ndarray, path: Path, max_side: int = 512) -> Path:
    """The middle frame as WebP (the format OpenAI's `variant=thumbnail` returns)."""
    image = Image.fromarray(frames[len(frames) // 2])
    image.thumbnail((max_side, max_side))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    image.save(tmp, format="WEBP", quality=85)
    os.replace(tmp, path)
    return path
