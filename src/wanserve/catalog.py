"""The served models: one `ModelSpec` each, with the official defaults. Torch-free, so the API can use it.

A model is named by a catalog name (`wan2.1-t2v-1.3b`), an alias users of the older systems type
(`t2v-1.3B`), a tiny test model (`tiny-t2v`), a local diffusers directory, or a Hugging Face repo id.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from wanserve.errors import ModelNotFound

Task = Literal["t2v", "i2v"]


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    repo_id: str | None  # Hugging Face diffusers repo; None for tiny models
    family: Literal["wan2.1", "wan2.2"]
    tasks: frozenset[str]
    width: int
    height: int
    num_frames: int
    fps: int
    num_inference_steps: int
    guidance_scale: float
    flow_shift: float
    guidance_scale_2: float | None = None  # second (low-noise) expert of the A14B models
    boundary_ratio: float | None = None  # set for two-expert models
    sizes: tuple[tuple[int, int], ...] = ()  # officially supported (width, height); others allowed if valid
    vae_stride: int = 8
    patch: int = 2
    temporal_stride: int = 4
    max_frames: int = 161
    max_pixels: int = 1280 * 720
    # Patches per side (and latent frames) the transformer's rotary table covers (`rope_max_seq_len`).
    max_side_patches: int = 1024
    aliases: tuple[str, ...] = ()
    tiny: bool = False
    # Described with generic defaults, not from its files: a repo id neither the catalog nor this machine's
    # HF cache knows. `serve` describes it again once its worker has the files.
    provisional: bool = False
    local_path: str | None = None  # set when the model was given as a directory
    # Served by multi-GPU groups that shard (Ulysses, ring, FSDP), as an API replica is told per model
    # (WANSERVE_SHARDED_MODEL): such a group runs no step cache, so no request for it may ask for one.
    sharded: bool = False
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def spatial_multiple(self) -> int:
        return self.vae_stride * self.patch

    @property
    def max_side(self) -> int:
        """The longest width or height in pixels, at whatever aspect ratio `max_pixels` allows."""
        return self.max_side_patches * self.spatial_multiple

    @property
    def rope_max_frames(self) -> int:
        """The longest video (stride·k + 1 frames) whose latent frames the rotary table covers."""
        return (self.max_side_patches - 1) * self.temporal_stride + 1

    @property
    def frame_limit(self) -> int:
        """The longest video a request may ask for: the model's own cap, or less where its rotary table ends."""
        return min(self.max_frames, self.rope_max_frames)

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def task_label(self) -> str:
        if self.tasks == {"t2v", "i2v"}:
            return "ti2v"
        return "+".join(sorted(self.tasks))

    @property
    def seconds(self) -> float:
        return round(self.num_frames / self.fps, 2)


_SIZES_720 = ((1280, 720), (720, 1280), (832, 480), (480, 832))
_SIZES_480 = ((832, 480), (480, 832))

CATALOG: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="wan2.1-t2v-1.3b",
        description="Wan 2.1 text-to-video, 1.3B, 480p",
        repo_id="Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
        family="wan2.1",
        tasks=frozenset({"t2v"}),
        width=832,
        height=480,
        num_frames=81,
        fps=16,
        num_inference_steps=50,
        guidance_scale=5.0,
        flow_shift=3.0,
        sizes=_SIZES_480,
        aliases=("t2v-1.3B",),
    ),
    ModelSpec(
        name="wan2.1-t2v-14b",
        description="Wan 2.1 text-to-video, 14B, 720p and 480p",
        repo_id="Wan-AI/Wan2.1-T2V-14B-Diffusers",
        family="wan2.1",
        tasks=frozenset({"t2v"}),
        width=1280,
        height=720,
        num_frames=81,
        fps=16,
        num_inference_steps=50,
        guidance_scale=5.0,
        flow_shift=5.0,
        sizes=_SIZES_720,
        aliases=("t2v-14B",),
    ),
    ModelSpec(
        name="wan2.1-i2v-14b-480p",
        description="Wan 2.1 image-to-video, 14B, 480p",
        repo_id="Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
        family="wan2.1",
        tasks=frozenset({"i2v"}),
        width=832,
        height=480,
        num_frames=81,
        fps=16,
        num_inference_steps=40,
        guidance_scale=5.0,
        flow_shift=3.0,
        sizes=_SIZES_480,
        aliases=("i2v-14B-480P",),
    ),
    ModelSpec(
        name="wan2.1-i2v-14b-720p",
        description="Wan 2.1 image-to-video, 14B, 720p",
        repo_id="Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
        family="wan2.1",
        tasks=frozenset({"i2v"}),
        width=1280,
        height=720,
        num_frames=81,
        fps=16,
        num_inference_steps=40,
        guidance_scale=5.0,
        flow_shift=5.0,
        sizes=_SIZES_720,
        aliases=("i2v-14B", "i2v-14B-720P"),
    ),
    ModelSpec(
        name="wan2.2-ti2v-5b",
        description="Wan 2.2 text+image-to-video, 5B dense, 720p at 24 fps",
        repo_id="Wan-AI/Wan2.2-TI2V-5B-Diffusers",
        family="wan2.2",
        tasks=frozenset({"t2v", "i2v"}),
        width=1280,
        height=704,
        num_frames=121,
        fps=24,
        num_inference_steps=50,
        guidance_scale=5.0,
        flow_shift=5.0,
        sizes=((1280, 704), (704, 1280)),
        vae_stride=16,
        max_frames=241,
        max_pixels=1280 * 704,
        aliases=("ti2v-5B",),
    ),
    ModelSpec(
        name="wan2.2-t2v-a14b",
        description="Wan 2.2 text-to-video, two 14B experts (high noise, low noise)",
        repo_id="Wan-AI/Wan2.2-T2V-A14B-Diffusers",
        family="wan2.2",
        tasks=frozenset({"t2v"}),
        width=1280,
        height=720,
        num_frames=81,
        fps=16,
        num_inference_steps=40,
        # Official (low, high) = (3.0, 4.0); `guidance_scale` drives the first (high-noise) expert.
        guidance_scale=4.0,
        guidance_scale_2=3.0,
        flow_shift=12.0,
        boundary_ratio=0.875,
        sizes=_SIZES_720,
        aliases=("t2v-A14B",),
    ),
    ModelSpec(
        name="wan2.2-i2v-a14b",
        description="Wan 2.2 image-to-video, two 14B experts (high noise, low noise)",
        repo_id="Wan-AI/Wan2.2-I2V-A14B-Diffusers",
        family="wan2.2",
        tasks=frozenset({"i2v"}),
        width=1280,
        height=720,
        num_frames=81,
        fps=16,
        num_inference_steps=40,
        guidance_scale=3.5,
        guidance_scale_2=3.5,
        flow_shift=5.0,
        boundary_ratio=0.900,
        sizes=_SIZES_720,
        aliases=("i2v-A14B",),
    ),
)

# Tiny models: the same diffusers classes at toy sizes, built offline (see engine/tiny.py).
_TINY_COMMON = dict(
    repo_id=None,
    width=64,
    height=64,
    num_frames=9,
    fps=8,
    num_inference_steps=4,
    guidance_scale=5.0,
    flow_shift=3.0,
    max_frames=33,
    max_pixels=256 * 256,
    max_side_patches=32,  # engine/tiny.py builds the transformers with rope_max_seq_len=32
    tiny=True,
)
TINY: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="tiny-t2v",
        description="tiny Wan 2.1-style text-to-video (tests, demos)",
        family="wan2.1",
        tasks=frozenset({"t2v"}),
        **_TINY_COMMON,  # type: ignore[arg-type]
    ),
    ModelSpec(
        name="tiny-i2v",
        description="tiny Wan 2.1-style image-to-video with a CLIP image encoder",
        family="wan2.1",
        tasks=frozenset({"i2v"}),
        **_TINY_COMMON,  # type: ignore[arg-type]
    ),
    ModelSpec(
        name="tiny-ti2v",
        description="tiny Wan 2.2 5B-style text+image-to-video (48-channel VAE, stride 16)",
        family="wan2.2",
        tasks=frozenset({"t2v", "i2v"}),
        vae_stride=16,
        **_TINY_COMMON,  # type: ignore[arg-type]
    ),
    ModelSpec(
        name="tiny-t2v-moe",
        description="tiny Wan 2.2 A14B-style text-to-video with two experts and a boundary",
        family="wan2.2",
        tasks=frozenset({"t2v"}),
        guidance_scale_2=3.0,
        boundary_ratio=0.875,
        **_TINY_COMMON,  # type: ignore[arg-type]
    ),
)

ALL_SPECS: tuple[ModelSpec, ...] = CATALOG + TINY


def _index() -> dict[str, ModelSpec]:
    index: dict[str, ModelSpec] = {}
    for spec in ALL_SPECS:
        index[spec.name.lower()] = spec
        for alias in spec.aliases:
            index[alias.lower()] = spec
        if spec.repo_id:
            index[spec.repo_id.lower()] = spec
    return index


def lookup(name: str) -> ModelSpec | None:
    """The catalog spec for a name, alias or known repo id (case-insensitive), else None."""
    return _index().get(name.strip().lower())


def looks_like_repo_id(name: str) -> bool:
    parts = name.split("/")
    return len(parts) == 2 and all(parts) and not name.startswith((".", "/", "~"))


def resolve_spec(name: str) -> ModelSpec:
    """Spec for any way of naming a model, without touching torch or the network.

    A local directory is described from its diffusers config files; an unknown repo id gets generic
    defaults that are refined once its files are on disk.
    """
    spec = lookup(name)
    if spec is not None:
        return spec
    path = Path(name).expanduser()
    if path.is_dir():
        return local_spec(path)
    if path.exists():  # `models/wan` is a file here: a local path, not a Hub repo id to download
        raise ModelNotFound(f"{name} is not a directory (a local model is a diffusers folder with model_index.json)")
    if looks_like_repo_id(name):
        snapshot = _cached_snapshot(name)
        if snapshot is not None:
            try:
                return repo_spec(spec_from_directory(snapshot), name)
            except ModelNotFound:  # a download cut short (a component missing): the worker's resumes it
                pass
        return ModelSpec(
            name=name,
            description=f"diffusers repo {name}",
            repo_id=name,
            family="wan2.1",
            tasks=frozenset({"t2v"}),
            width=832,
            height=480,
            num_frames=81,
            fps=16,
            num_inference_steps=50,
            guidance_scale=5.0,
            flow_shift=3.0,
            provisional=True,
        )
    if name.startswith((".", "/", "~")) or os.sep in name.rstrip(os.sep):
        raise ModelNotFound(f"{name} is not a directory (a local model is a diffusers folder with model_index.json)")
    known = ", ".join(s.name for s in ALL_SPECS)
    raise ModelNotFound(
        f"unknown model {name!r}: use a catalog name ({known}), an alias such as t2v-1.3B, "
        "a local diffusers directory, or a Hugging Face repo id like Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    )


def _cached_snapshot(repo_id: str) -> Path | None:
    """The repo's folder in this machine's Hugging Face cache, if it is there (no network)."""
    try:
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # not cached, or no such cache
        return None
    return folder if (folder / "model_index.json").is_file() else None


def complete_snapshot(repo_id: str) -> Path | None:
    """The repo's folder in the Hugging Face cache when every component it names is there: the Hub client
    names a snapshot before its files are in, so a download cut short leaves one that would not load."""
    folder = _cached_snapshot(repo_id)
    if folder is None:
        return None
    try:
        spec_from_directory(folder)
    except ModelNotFound:
        return None
    return folder


def repo_spec(described: ModelSpec, repo_id: str) -> ModelSpec:
    """A repo the catalog does not know, described from its files, under its repo id (not its cache folder)."""
    return replace(described, name=repo_id, repo_id=repo_id, local_path=None, description=f"diffusers repo {repo_id}")


def _named_after(path: Path) -> ModelSpec | None:
    """The catalog model a local copy is named after: its folder is the catalog name, an alias, or the repo's
    own name (as `hf download --local-dir` is told in the docs)."""
    # The name as given first: a symlink /models/wan2.2-ti2v-5b may point at a snapshot folder named otherwise.
    folders = (path.expanduser().name.lower(), path.expanduser().resolve().name.lower())
    for folder in folders:
        for spec in ALL_SPECS:
            names = {spec.name, *spec.aliases, *([spec.repo_id.split("/")[-1]] if spec.repo_id else [])}
            if folder in {n.lower() for n in names}:
                return spec
    return None


def models_dir_copy(spec: ModelSpec, models_dir: Path | None) -> Path | None:
    """Where a copy of `spec` lies in the models dir: `<dir>/<name>`, or `<dir>/<the repo's own name>`."""
    if models_dir is None:
        return None
    for candidate in (models_dir / spec.name, models_dir / str(spec.repo_id).split("/")[-1]):
        if (candidate / "model_index.json").exists():
            return candidate
    return None


def copy_of(spec: ModelSpec, path: Path) -> ModelSpec:
    """`spec`, described from the copy at `path` found under its name (a models dir): refused when the files are
    another model (an I2V copy under a T2V name served nothing: the API took text requests the workers failed).
    A repo the catalog does not know is what its files say."""
    described = spec_from_directory(path)
    if spec.provisional:
        return repo_spec(described, str(spec.repo_id))
    if described.tasks != spec.tasks or described.two_experts != spec.two_experts:
        experts = {True: "two experts", False: "one transformer"}
        raise ModelNotFound(
            f"{path} holds another model ({described.task_label}, {experts[described.two_experts]}) than "
            f"{spec.name} ({spec.task_label}, {experts[spec.two_experts]}): put {spec.name}'s files there"
        )
    return spec_from_directory(path, base=spec)


def local_spec(path: Path) -> ModelSpec:
    """A local diffusers folder, described from its files; a copy of a catalog model, named after it, keeps
    that model's official defaults (TI2V-5B's 24 fps, A14B's guidance and steps) and may be asked for by its
    catalog name, when its files agree with the catalog on what it is."""
    described = spec_from_directory(path)
    base = _named_after(path)
    if base is None or base.tasks != described.tasks or base.two_experts != described.two_experts:
        return described
    merged = spec_from_directory(path, base=base)
    if max(merged.width, merged.height) > merged.max_side or merged.num_frames > merged.rope_max_frames:
        return described  # smaller weights than the name says: the catalog's defaults would not run on them
    return replace(
        merged,
        name=described.name,  # the folder, as given: what its workers load and their queue's name
        tiny=False,  # loaded from the folder like any other, not built
        description=f"{base.name} at {described.local_path}",
        aliases=(base.name, *base.aliases),
    )


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8, or not JSON
        raise ModelNotFound(f"{path} cannot be read as a diffusers config: {exc}") from None
    if not isinstance(data, dict):
        raise ModelNotFound(f"{path} holds a JSON {type(data).__name__}, not the object a diffusers config is")
    return data


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _config_number(file: Path, config: dict, key: str, default: Any, kind: type, what: str) -> Any:
    """`config[key]` as `kind` (int: positive), `default` where absent or null; else a ModelNotFound naming the
    file and the key: a damaged config otherwise ended in a traceback (`'int' object is not subscriptable`)."""
    value = config.get(key)
    if value is None:
        return default
    if kind is int:
        if _positive_int(value):
            return value
    elif isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0:
        return float(value)
    raise ModelNotFound(f"{file}: {key} must be {what}, got {value!r}")


# The pipelines the engine runs. Wan's other ones (VACE, Animate, video-to-video) take inputs it never passes.
SUPPORTED_PIPELINES = ("WanPipeline", "WanImageToVideoPipeline")


def spec_from_directory(path: Path, base: ModelSpec | None = None) -> ModelSpec:
    """Describe a diffusers Wan directory from its config files (torch-free).

    When `base` is given (a catalog or tiny spec), its defaults are kept and only the structural facts
    (tasks, strides, experts) are taken from the files, which are the truth about the weights.
    """
    path = path.expanduser().resolve()
    index = _read_json(path / "model_index.json")
    if not index:
        raise ModelNotFound(f"{path} is not a diffusers model directory: model_index.json is missing")
    pipeline_class = index.get("_class_name", "")
    if not isinstance(pipeline_class, str) or not pipeline_class.startswith("Wan"):
        raise ModelNotFound(f"{path} holds a {pipeline_class or 'unknown'} pipeline, not a Wan pipeline")
    if pipeline_class not in SUPPORTED_PIPELINES:
        raise ModelNotFound(
            f"{path} holds a {pipeline_class}, which wanserve does not run "
            f"(it runs {' and '.join(SUPPORTED_PIPELINES)})"
        )
    # Each component model_index.json names must be there: diffusers would stop on the first one missing
    # with a message that names none of them.
    missing = [
        name
        for name, value in index.items()
        if not name.startswith("_") and isinstance(value, list) and value[:1] != [None] and not (path / name).is_dir()
    ]
    if missing:
        raise ModelNotFound(f"{path} is incomplete: model_index.json names {', '.join(missing)}, not in the folder")
    # What every Wan pipeline runs on; one left out of model_index.json failed deep in the engine (an IndexError).
    named = {name for name, value in index.items() if isinstance(value, list) and value[:1] != [None]}
    unnamed = [name for name in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler") if name not in named]
    if unnamed:
        raise ModelNotFound(f"{path / 'model_index.json'} names no {', no '.join(unnamed)}: a Wan pipeline needs each")
    vae_file = path / "vae" / "config.json"
    vae = _read_json(vae_file)
    transformer_file = path / "transformer" / "config.json"
    transformer = _read_json(transformer_file)
    if not transformer:
        transformer_file = path / "transformer_2" / "config.json"
        transformer = _read_json(transformer_file)
    scheduler_file = path / "scheduler" / "scheduler_config.json"
    scheduler = _read_json(scheduler_file)
    shift_key = "flow_shift" if "flow_shift" in scheduler else "shift"
    expand = bool(index.get("expand_timesteps"))
    between = "a number between 0 and 1"
    boundary = _config_number(path / "model_index.json", index, "boundary_ratio", None, float, between)
    if boundary is not None and not boundary < 1:
        raise ModelNotFound(f"{path / 'model_index.json'}: boundary_ratio must be {between}, got {boundary!r}")
    if boundary is not None and "transformer_2" not in named:  # one expert would run every step, silently
        raise ModelNotFound(
            f"{path / 'model_index.json'} sets boundary_ratio, which switches to a second expert, "
            "but names no transformer_2"
        )
    if pipeline_class == "WanImageToVideoPipeline":
        tasks = frozenset({"t2v", "i2v"}) if expand else frozenset({"i2v"})
    elif expand:
        tasks = frozenset({"t2v", "i2v"})  # Wan 2.2 TI2V: one checkpoint, both tasks
    else:
        tasks = frozenset({"t2v"})
    patch = transformer.get("patch_size", [1, 2, 2])
    if not (isinstance(patch, list) and len(patch) == 3 and all(_positive_int(p) for p in patch)):
        raise ModelNotFound(f"{transformer_file}: patch_size must be three positive whole numbers, got {patch!r}")
    positive = "a positive whole number"
    structural = dict(
        tasks=tasks,
        vae_stride=_config_number(vae_file, vae, "scale_factor_spatial", 8, int, positive),
        temporal_stride=_config_number(vae_file, vae, "scale_factor_temporal", 4, int, positive),
        patch=int(patch[1]),
        max_side_patches=_config_number(transformer_file, transformer, "rope_max_seq_len", 1024, int, positive),
        boundary_ratio=boundary,
        family="wan2.2" if (expand or boundary is not None) else "wan2.1",
        local_path=str(path),
    )
    if base is not None:
        merged = replace(base, **structural)  # type: ignore[arg-type]
        if merged.boundary_ratio is not None and merged.guidance_scale_2 is None:
            merged = replace(merged, guidance_scale_2=merged.guidance_scale)
        return merged
    spec = ModelSpec(
        name=str(path),
        description=f"local {pipeline_class} at {path}",
        repo_id=None,
        width=832,
        height=480,
        num_frames=81,
        fps=16,
        num_inference_steps=50,
        guidance_scale=5.0,
        guidance_scale_2=5.0 if boundary is not None else None,
        flow_shift=_config_number(scheduler_file, scheduler, shift_key, 3.0, float, "a positive number"),
        max_pixels=1280 * 720,
        **structural,  # type: ignore[arg-type]
    )
    # Wan 2.1's 480p defaults, within what this transformer's position table reaches (a small model's may not).
    return replace(
        spec,
        width=min(spec.width, spec.max_side),
        height=min(spec.height, spec.max_side),
        num_frames=min(spec.num_frames, spec.rope_max_frames),
    )
