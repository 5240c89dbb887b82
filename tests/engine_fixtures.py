"""Fixtures shared by the tests that run the engine (registered from conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache of tiny models for the whole run: built once, loaded through from_pretrained after."""
    from wanserve.engine.tiny import TINY_NAMES, tiny_model_dir

    cache = tmp_path_factory.mktemp("wanserve-cache")
    for name in TINY_NAMES:
        tiny_model_dir(name, cache)
    return cache


def wan22_fitted(image: bytes, width: int, height: int):  # type: ignore[no-untyped-def]
    """The input image as Wan 2.2's reference pipeline fits it to the video: scaled to cover width x height,
    the middle cut out. One of the video's own shape is left whole."""
    import io

    from PIL import Image

    picture = Image.open(io.BytesIO(image)).convert("RGB")
    if picture.width * height == picture.height * width:
        return picture
    # The middle of the source with the frame's aspect ratio, scaled (Lanczos) to the frame.
    if picture.width * height > picture.height * width:  # wider than the frame: the sides go
        cut = picture.height * width / height
        box = ((picture.width - cut) / 2, 0, (picture.width + cut) / 2, picture.height)
    else:  # taller: the top and bottom go
        cut = picture.width * height / width
        box = (0, (picture.height - cut) / 2, picture.width, (picture.height + cut) / 2)
    return picture.resize((width, height), Image.Resampling.LANCZOS, box=box)


def diffusers_latents(pipe, req, image: bytes | None, fit: bool = True):  # type: ignore[no-untyped-def]
    """The latents plain diffusers produces for a resolved request: the reference our loop must match. Its
    image is first fitted as Wan 2.2 does (`fit`; diffusers itself would stretch it to the video's shape)."""
    import io

    import torch
    from PIL import Image

    kwargs: dict = dict(
        prompt=req.prompt,
        negative_prompt=req.negative_prompt,
        height=req.height,
        width=req.width,
        num_frames=req.num_frames,
        num_inference_steps=req.num_inference_steps,
        guidance_scale=req.guidance_scale,
        generator=torch.Generator("cpu").manual_seed(req.seed or 0),
        output_type="latent",
    )
    if req.guidance_scale_2 is not None:
        kwargs["guidance_scale_2"] = req.guidance_scale_2
    if image is not None:
        raw = Image.open(io.BytesIO(image)).convert("RGB")
        kwargs["image"] = wan22_fitted(image, req.width, req.height) if fit else raw
    return pipe(**kwargs).frames
