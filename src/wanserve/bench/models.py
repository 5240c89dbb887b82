"""Random-weight models at the released architectures (or a checkpoint), built the way the engine loads them."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from wanserve.bench.options import BenchOptions
from wanserve.bench.shapes import UMT5_XXL, Shape


def build_models(
    shape: Shape, options: BenchOptions, settings: Any, device: torch.device, dtype: torch.dtype, request: bool
) -> tuple[Any, Any, str | None, Any]:
    """(pipeline or None, spec or None, what a fresh process would load or None, the transformer to time)."""
    from wanserve.catalog import resolve_spec
    from wanserve.engine.loading import load_pipeline, locate

    if shape.tiny or options.checkpoint is not None:
        model_ref = shape.model if shape.tiny else str(options.checkpoint)
        spec, path = locate(model_ref, settings)
        pipe = load_pipeline(path, dtype=dtype, vae_dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        pipe.to(device)
        return pipe, spec, model_ref, pipe.transformer
    kwargs = dict(shape.transformer)
    if options.layers:
        kwargs["num_layers"] = options.layers
    if not request:
        return None, None, None, build_random_transformer(kwargs, device, dtype)
    spec = resolve_spec(shape.model)
    pipe = build_random_pipeline(shape, kwargs, spec, device, dtype)
    return pipe, spec, None, pipe.transformer


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_random_transformer(kwargs: dict[str, Any], device: torch.device, dtype: torch.dtype) -> Any:
    """A WanTransformer3DModel with random weights, laid out as `from_pretrained(..., torch_dtype=dtype)` would."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    # Initialised directly in `dtype` on the device: a float32 init of 14B parameters would need 56 GB first.
    with _default_dtype(dtype), torch.device(device):
        model = WanTransformer3DModel(**kwargs)
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or ())
    for name, param in model.named_parameters():
        if keep & set(name.split(".")):
            param.data = param.data.float()
    return model.eval().requires_grad_(False)


def build_random_pipeline(
    shape: Shape, transformer_kwargs: dict[str, Any], spec: Any, device: torch.device, dtype: torch.dtype
) -> Any:
    """The whole pipeline at the real sizes with random weights: UMT5-XXL, the model's VAE, the transformer
    (both experts for A14B) and, for Wan 2.1 I2V, a CLIP ViT-H/14 image encoder."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from wanserve.engine.tiny import _tokenizer

    transformer = build_random_transformer(transformer_kwargs, device, dtype)
    with _default_dtype(dtype), torch.device(device):
        text_encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL)).eval().requires_grad_(False)
    with torch.device(device):
        vae = AutoencoderKLWan(**shape.vae).eval().requires_grad_(False)  # float32, as Engine.load keeps it
    scheduler = UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=spec.flow_shift
    )
    # A byte-level tokenizer (no download): prompts are padded to 512 tokens either way, so the cost is the same.
    common: dict[str, Any] = dict(
        tokenizer=_tokenizer(), text_encoder=text_encoder, vae=vae, scheduler=scheduler, transformer=transformer
    )
    if transformer_kwargs.get("image_dim"):
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        vision = CLIPVisionConfig(
            hidden_size=1280,
            intermediate_size=5120,
            num_hidden_layers=32,
            num_attention_heads=16,
            image_size=224,
            patch_size=14,
            projection_dim=1024,
            hidden_act="gelu",
        )
        with torch.device(device):
            image_encoder = CLIPVisionModel(vision).eval().requires_grad_(False)
        processor = CLIPImageProcessor(crop_size={"height": 224, "width": 224}, size={"shortest_edge": 224})
        pipe = WanImageToVideoPipeline(**common, image_encoder=image_encoder, image_processor=processor)
    elif spec.two_experts:
        pipe = WanPipeline(
            **common,
            transformer_2=build_random_transformer(transformer_kwargs, device, dtype),
            boundary_ratio=spec.boundary_ratio,
        )
    else:
        pipe = WanPipeline(**common, expand_timesteps=shape.expand_timesteps)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_pipeline(pipe: Any, path: Path) -> Path:
    pipe.save_pretrained(path, safe_serialization=True)
    return path
