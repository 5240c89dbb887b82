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


def diffusers_latents(pipe, req, image: bytes | None):  # type: ignore[no-untyped-def]
    """The latents plain diffusers produces for a resolved request: the reference our loop must match."""
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
        kwargs["image"] = Image.open(io.BytesIO(image)).convert("RGB")
    return pipe(**kwargs).frames
