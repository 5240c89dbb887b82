"""Decode what wanserve wrote, the way a user's player would."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np


@dataclass
class DecodedVideo:
    frames: np.ndarray  # (T, H, W, 3) uint8
    fps: float
    width: int
    height: int
    codec: str
    pix_fmt: str


def decode_mp4(path: Path | str) -> DecodedVideo:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        return DecodedVideo(
            frames=np.stack(frames),
            fps=float(stream.average_rate),
            width=stream.codec_context.width,
            height=stream.codec_context.height,
            codec=stream.codec_context.name,
            pix_fmt=stream.codec_context.pix_fmt,
        )


def moov_before_mdat(path: Path | str) -> bool:
    """faststart: the index (moov) comes before the media data, so playback starts before the download ends."""
    data = Path(path).read_bytes()
    return 0 <= data.find(b"moov") < data.find(b"mdat")


def png_bytes(color: tuple[int, int, int], size: tuple[int, int] = (96, 64)) -> bytes:
    import io

    from PIL import Image, ImageDraw

    image = Image.new("RGB", size, color)
    ImageDraw.Draw(image).ellipse((10, 10, size[0] // 2, size[1] - 10), fill=(255 - color[0], 128, color[2] // 2))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
