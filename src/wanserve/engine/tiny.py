"""Tiny Wan models for tests and demos: the real diffusers/transformers classes at toy sizes.

Each is built offline with a fixed seed (no download: the tokenizer is a byte-level one made here),
written once in diffusers format under `<cache_dir>/tiny/<name>`, and from then on loaded through the
same `from_pretrained` path as a real checkpoint.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

TINY_NAMES = ("tiny-t2v", "tiny-i2v", "tiny-ti2v", "tiny-t2v-moe")
# Bump when the configs below change, so stale caches are rebuilt instead of silently reused.
TINY_VERSION = 1
TEXT_DIM = 32
VOCAB = 256 + 3  # bytes + <pad>, </s>, <unk>


@contextlib.contextmanager
def _lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tiny_model_dir(name: str, cache_dir: Path) -> Path:
    """Path of the tiny model, building it first if this cache does not have it yet."""
    if name not in TINY_NAMES:
        raise ValueError(f"unknown tiny model {name!r}; tiny models are {', '.join(TINY_NAMES)}")
    target = Path(cache_dir).expanduser() / "tiny" / f"{name}-v{TINY_VERSION}"
    if (target / "model_index.json").exists():
        return target
    with _lock(target.parent / f".{name}.lock"):
        if (target / "model_index.json").exists():  # another process built it while we waited
            return target
        scratch = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            import diffusers
            import transformers

            # A few kB written locally: "Writing model shards 100%" bars only clutter a first `make serve`.
            diffusers.utils.logging.disable_progress_bar()
            transformers.utils.logging.disable_progress_bar()
            _build(name).save_pretrained(scratch, safe_serialization=True)
            (scratch / "wanserve_tiny.json").write_text(json.dumps({"name": name, "version": TINY_VERSION}))
            scratch.rename(target)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return target


def _tokenizer():  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level BPE with no merges: every byte is a token, so any prompt tokenizes, offline.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>", model_max_length=512
    )


def _text_encoder():  # type: ignore[no-untyped-def]
    from transformers import UMT5Config, UMT5EncoderModel

    config = UMT5Config(
        vocab_size=VOCAB,
        d_model=TEXT_DIM,
        d_kv=8,
        d_ff=64,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    return UMT5EncoderModel(config).eval()


def _transformer(in_channels: int, out_channels: int, image_dim: int | None = None):  # type: ignore[no-untyped-def]
    from diffusers import WanTransformer3DModel

    return WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=12,
        in_channels=in_channels,
        out_channels=out_channels,
        text_dim=TEXT_DIM,
        freq_dim=32,
        ffn_dim=32,
        num_layers=2,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        image_dim=image_dim,
        rope_max_seq_len=32,
    ).eval()


def _scheduler(shift: float = 3.0):  # type: ignore[no-untyped-def]
    from diffusers import UniPCMultistepScheduler

    # The scheduler the real Wan diffusers repos ship.
    return UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000, flow_shift=shift
    )


def _build(name: str):  # type: ignore[no-untyped-def]
    import torch
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline, WanPipeline

    torch.manual_seed({"tiny-t2v": 0, "tiny-i2v": 1, "tiny-ti2v": 2, "tiny-t2v-moe": 3}[name])
    tokenizer, text_encoder = _tokenizer(), _text_encoder()

    if name == "tiny-ti2v":
        # Wan 2.2 5B style: 48-channel latent, patchified residual VAE with spatial stride 16.
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=48,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=[0.0] * 48,
            latents_std=[1.0] * 48,
            is_residual=True,
            in_channels=12,
            out_channels=12,
            patch_size=2,
            scale_factor_spatial=16,
            scale_factor_temporal=4,
        ).eval()
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=_scheduler(),
            transformer=_transformer(48, 48),
            expand_timesteps=True,
        )

    vae = AutoencoderKLWan(
        base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1, temperal_downsample=[False, True, True]
    ).eval()
    if name == "tiny-i2v":
        from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

        image_encoder = CLIPVisionModel(
            CLIPVisionConfig(
                hidden_size=8,
                projection_dim=8,
                num_hidden_layers=2,
                num_attention_heads=2,
                image_size=32,
                intermediate_size=16,
                patch_size=4,
            )
        ).eval()
        image_processor = CLIPImageProcessor(
            crop_size={"height": 32, "width": 32}, size={"shortest_edge": 32}, do_center_crop=True
        )
        return WanImageToVideoPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=_scheduler(),
            image_processor=image_processor,
            image_encoder=image_encoder,
            # i2v input: 16 noise channels + 4 mask + 16 condition latents.
            transformer=_transformer(36, 16, image_dim=8),
        )
    if name == "tiny-t2v-moe":
        return WanPipeline(
            tokenizer=tokenizer,
            text_encoder=text_encoder,
            vae=vae,
            scheduler=_scheduler(),
            transformer=_transformer(16, 16),
            transformer_2=_transformer(16, 16),
            boundary_ratio=0.875,
        )
    return WanPipeline(
        tokenizer=tokenizer,
        text_encoder=text_encoder,
        vae=vae,
        scheduler=_scheduler(),
        transformer=_transformer(16, 16),
    )
