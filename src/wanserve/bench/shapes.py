"""The model shapes `wanserve bench` measures: the released transformer, VAE and text-encoder configs, each
shape's size, unit of timing and targets from the issue, and the published figures they are compared with."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

# WanTransformer3DModel configs of the released checkpoints (their transformer/config.json).
_COMMON: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    attention_head_dim=128,
    text_dim=4096,
    freq_dim=256,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=1024,
)
T2V_1_3B = dict(_COMMON, num_attention_heads=12, ffn_dim=8960, num_layers=30, in_channels=16, out_channels=16)
T2V_14B = dict(_COMMON, num_attention_heads=40, ffn_dim=13824, num_layers=40, in_channels=16, out_channels=16)
I2V_14B = dict(T2V_14B, in_channels=36, image_dim=1280, added_kv_proj_dim=5120)
TI2V_5B = dict(_COMMON, num_attention_heads=24, ffn_dim=14336, num_layers=30, in_channels=48, out_channels=48)

# AutoencoderKLWan: the Wan 2.1 VAE is diffusers' default config; the Wan 2.2 (TI2V-5B) one is patchified.
VAE_21: dict[str, Any] = {}
VAE_22: dict[str, Any] = dict(
    base_dim=160,
    decoder_base_dim=256,
    z_dim=48,
    dim_mult=[1, 2, 4, 4],
    num_res_blocks=2,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[0.0] * 48,
    latents_std=[1.0] * 48,
)
# google/umt5-xxl, the text encoder of every Wan model.
UMT5_XXL: dict[str, Any] = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    tie_word_embeddings=False,
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)


@dataclass(frozen=True)
class Shape:
    name: str
    model: str  # catalog name: request defaults, and the spec the engine serves
    transformer: dict[str, Any]
    width: int
    height: int
    num_frames: int
    unit: Literal["forward", "cfg_step"]  # what one timed call is
    vae: dict[str, Any] = field(default_factory=dict)
    vae_stride: int = 8
    expand_timesteps: bool = False  # Wan 2.2 TI2V: one timestep per token
    request: bool = False  # whole-request timing by default (random weights need a random T5 and VAE too)
    projection_steps: int | None = None  # project a whole request from one CFG step
    published_diffusers_ms: float | None = None  # the baseline, 1x H100, bf16
    # What the seconds targets were set against (diffusers' s/step, the official total): with it, a seconds
    # target is also judged as the speed-up it asks for over diffusers timed in the same run, on any card.
    reference_seconds: tuple[str, float] | None = None
    targets: dict[str, float] = field(default_factory=dict)
    tiny: bool = False


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape(
            "1.3b-480p",
            "wan2.1-t2v-1.3b",
            T2V_1_3B,
            832,
            480,
            81,
            "forward",
            vae=VAE_21,
            request=True,
            published_diffusers_ms=623.0,
            targets={"forward_speedup_exact": 1.3, "request_speedup_exact": 1.25, "serving_busy_fraction": 0.97},
        ),
        Shape(
            "5b-720p",
            "wan2.2-ti2v-5b",
            TI2V_5B,
            1280,
            704,
            121,
            "forward",
            vae=VAE_22,
            vae_stride=16,
            expand_timesteps=True,
            request=True,
            published_diffusers_ms=1078.0,
            targets={"forward_speedup_exact": 1.3},
        ),
        Shape(
            "14b-720p-8layers",
            "wan2.1-t2v-14b",
            dict(T2V_14B, num_layers=8),
            1280,
            720,
            81,
            "forward",
            published_diffusers_ms=2489.0,
            targets={"forward_speedup_exact": 1.3},
        ),
        Shape(
            "14b-i2v-480p",
            "wan2.1-i2v-14b-480p",
            I2V_14B,
            832,
            480,
            81,
            "cfg_step",
            vae=VAE_21,
            targets={"step_seconds_exact": 5.2, "step_seconds_fastest": 2.6},
            reference_seconds=("published diffusers, 1x H100", 9.77),
        ),
        Shape(
            "a14b-720p",
            "wan2.2-t2v-a14b",
            T2V_14B,
            1280,
            720,
            81,
            "cfg_step",
            vae=VAE_21,
            projection_steps=40,
            reference_seconds=("the official Wan2.2 code, 1x H100", 1041.5),
            # Its CFG step is two forwards of the 14B transformer at 75,600 tokens: the 14b-720p forward's ratio.
            targets={
                "forward_speedup_exact": 1.3,
                "projected_seconds_exact": 833.0,
                "projected_seconds_fastest": 400.0,
            },
        ),
        Shape("tiny", "tiny-t2v", {}, 64, 64, 9, "forward", request=True, tiny=True),
    )
}

# Published per-step figures for Wan2.1-I2V-14B 480p 81 frames, 40 steps, one H100 (from the issue).
PUBLISHED = {
    "wan2.1-i2v-14b-480p_s_per_step_1xH100": {
        "diffusers": 9.77,
        "xDiT": 8.93,
        "FastVideo": 7.35,
        "SGLang": 6.13,
        "LightX2V": 5.18,
    },
    "wan2.2-t2v-a14b-720p_official_seconds": 1041.5,
}


def describe_shape(shape: Shape, config: Any) -> dict[str, Any]:
    return {
        "name": shape.name,
        "model": shape.model,
        "width": shape.width,
        "height": shape.height,
        "num_frames": shape.num_frames,
        "unit": shape.unit,
        "num_layers": int(config.num_layers),
        "hidden": int(config.num_attention_heads * config.attention_head_dim),
        "heads": int(config.num_attention_heads),
        "ffn_dim": int(config.ffn_dim),
        "in_channels": int(config.in_channels),
        "published_diffusers_ms": shape.published_diffusers_ms,
    }
