"""A generation request and the rules it must meet for a given model. Torch-free: the API checks these
at submit time with the same code the engine uses before any GPU work."""

from __future__ import annotations

import base64
import io
import math
import re
import secrets
import threading
import unicodedata
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from wanserve.catalog import ModelSpec
from wanserve.errors import InvalidRequest

MAX_SEED = 2**63 - 1
MAX_PROMPT_CHARS = 20_000
MAX_FPS = 60
# An 8K photo is 33 Mpx; past this the decode alone costs the API hundreds of MB for a frame the model
# sees at a few hundred thousand pixels.
MAX_IMAGE_PIXELS = 40_000_000
# libwebp's decode holds about four times what the others' do (611 MB measured at 40 Mpx): a WebP is held to
# what keeps two at once inside an API pod's memory. A phone's WebP is 12 Mpx.
MAX_WEBP_PIXELS = 16_000_000
# A progressive JPEG decodes once per scan: encoders write about ten, and a 300 kB file of 20,000 scans held
# a decode slot for 25 s of CPU. Counted before decoding (each scan starts with the SOS marker, FF DA).
MAX_JPEG_SCANS = 100
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP")
# A decode holds up to 4 bytes a pixel (160 MB at the largest image taken), and turning it into the model's
# RGB as many again for each copy: an API replica, which only checks images (`check_image`: the decode alone),
# holds at most two at once, 320 MB, well inside its pod's 1 GiB; the rest wait their turn.
_DECODING = threading.BoundedSemaphore(2)
# EXIF orientations that turn the picture a quarter: its upright width is its stored height.
_QUARTER_TURNS = frozenset({5, 6, 7, 8})
# Wan's official default negative prompt (from the reference generate.py); used for real checkpoints.
WAN_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走"
)

PRESET_NAMES = ("exact", "fast", "fastest")


def request_presets(serving: str, step_cache: bool = True) -> tuple[str, ...]:
    """The presets a request may name where `serving` is the workers' preset.

    Only the step cache changes per request (hooks around the transformer blocks, outside compiled code). The
    FP8 weights and 8-bit attention of `fastest` are fixed when a worker loads: a `fastest` worker serves
    `fastest` only, and no other worker can become it. Where the step cache cannot run at all (ranks holding
    shards of one sequence or of the weights), a request gets `exact` or what the workers serve."""
    if serving == "fastest":
        return ("fastest",)
    return ("exact", "fast") if step_cache else tuple(dict.fromkeys(("exact", serving)))


def _check_preset(value: object, spec: ModelSpec, serving: str | None, step_cache: bool) -> None:
    if not isinstance(value, str) or value not in PRESET_NAMES:
        raise InvalidRequest("preset", f"must be one of {', '.join(PRESET_NAMES)}, got {value!r}")
    if serving is None or serving not in PRESET_NAMES:
        return
    allowed = request_presets(serving, step_cache)
    if value in allowed:
        return
    if "fastest" in (value, serving):
        why = "FP8 weights and 8-bit attention are chosen when a worker starts (its --preset or WANSERVE_PRESET)"
    else:
        why = "the step cache is off where ranks hold shards of one video (ulysses, ring, fsdp)"
    raise InvalidRequest(
        "preset",
        f"{value!r} cannot be served: {spec.name} runs preset {serving!r}, whose requests may ask for "
        f"{' or '.join(allowed)}; {why}",
    )


@dataclass
class GenerationRequest:
    prompt: str
    negative_prompt: str | None = None
    image: bytes | None = None  # encoded PNG / JPEG / WebP
    width: int | None = None
    height: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    boundary_ratio: float | None = None
    flow_shift: float | None = None
    seed: int | None = None
    preset: str | None = None  # None: the workers' own; else one of request_presets(their preset)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if self.image is not None:
            data["image"] = base64.b64encode(self.image).decode("ascii")
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}
        if isinstance(values.get("image"), str):
            values["image"] = base64.b64decode(values["image"])
        return cls(**values)


def _is_number(value: object) -> bool:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer too large for a float: 1e400 spelt out
        return False


def _check_unicode(field: str, text: str) -> None:
    """A lone surrogate (JSON's "\\ud800", or a command-line byte that is not UTF-8, which Python keeps as one)
    cannot be tokenized: the engine failed on it after loading the model."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidRequest(
            field, "must be UTF-8 text: it holds a lone surrogate (a byte that is not UTF-8, or JSON's \\ud800)"
        ) from None
    # A model reads control characters as noise: one in a prompt is a paste gone wrong, not what was meant.
    control = next((c for c in text if unicodedata.category(c) == "Cc" and c not in "\t\n\r"), None)
    if control is not None:
        raise InvalidRequest(field, f"must not hold control characters, found U+{ord(control):04X}")


def _visible(text: str) -> bool:
    """Whether `text` holds a character that shows: a prompt of only spaces, zero-width and format characters
    (U+200B, U+FEFF: pasted from a web page) made a video of nothing the user could see they asked for."""
    return any(not c.isspace() and unicodedata.category(c) not in ("Cc", "Cf", "Zs", "Zl", "Zp") for c in text)


def _quoted_number(value: object) -> str:
    """A hint for the commonest slip: a number sent as a JSON string ("5" for 5)."""
    return " (a number, not a string)" if isinstance(value, str) else ""


def _int(field: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise InvalidRequest(field, f"must be an integer{_quoted_number(value)}, got {value!r}")
    return value


def _float(field: str, value: object) -> float:
    if not _is_number(value):
        raise InvalidRequest(field, f"must be a finite number{_quoted_number(value)}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


# ASCII digits only: int() also takes `6_4` and full-width digits, which no client means as a size.
_SIZE = re.compile(r"\s*(\d{1,9})\s*[xX*×]\s*(\d{1,9})\s*", re.ASCII)


def parse_size(text: str, field: str = "size") -> tuple[int, int]:
    """`832x480`, `832*480`, `832X480` or `832×480` -> (width, height)."""
    match = _SIZE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        # Each field's own spelling: the legacy routes' `resolution` and `image_size` are documented as 1280*704.
        example = (
            "WIDTH*HEIGHT (for example 1280*704)"
            if field in ("resolution", "image_size")
            else "WIDTHxHEIGHT (for example 832x480)"
        )
        raise InvalidRequest(field, f"must look like {example}, got {text!r}")
    return int(match[1]), int(match[2])


def decode_image(data: bytes, field: str = "image") -> Any:
    """The input image as the model gets it, RGB and upright: decoded in full (a file cut short or damaged
    past its header is refused here, at submit, not failed minutes later on a worker) and turned as its EXIF
    orientation says, as a browser shows it and diffusers' `load_image` does (phone photos are stored sideways)."""
    return _read_image(data, field, size_only=False)


def check_image(data: bytes, field: str = "image") -> tuple[int, int]:
    """The (width, height) of the input image as the model will see it, upright, once it has decoded in full
    (as `decode_image` checks it), without the RGB copies only the model needs: an API's check of a 40 Mpx
    RGBA image held 760 MB where the decode alone holds 160."""
    size: tuple[int, int] = _read_image(data, field, size_only=True)
    return size


def _read_image(data: bytes, field: str, size_only: bool) -> Any:
    from PIL import Image, ImageOps

    if not isinstance(data, bytes | bytearray | memoryview):
        kind = type(data).__name__
        raise InvalidRequest(field, f"must be the image file's bytes (PNG, JPEG or WebP), got {kind}")
    try:
        with Image.open(io.BytesIO(data), formats=IMAGE_FORMATS) as img:
            width, height = img.size
            if width * height > MAX_IMAGE_PIXELS:
                raise InvalidRequest(
                    field, f"has too many pixels ({width}x{height}; at most {MAX_IMAGE_PIXELS:,}): scale it down"
                )
            if img.format == "WEBP" and width * height > MAX_WEBP_PIXELS:
                raise InvalidRequest(
                    field,
                    f"is a WebP of too many pixels ({width}x{height}; at most {MAX_WEBP_PIXELS:,} for WebP): scale "
                    "it down, or send it as PNG or JPEG",
                )
            if img.format in ("JPEG", "MPO") and (scans := bytes(data).count(b"\xff\xda")) > MAX_JPEG_SCANS:
                # (Entropy-coded data never holds FF DA, so this counts scans, and an EXIF preview's few.)
                raise InvalidRequest(
                    field, f"is a JPEG of {scans} scans (at most {MAX_JPEG_SCANS}; encoders write about ten)"
                )
            # Only its first frame would reach the model, without a word. Not MPO: a phone's JPEG may carry a
            # second picture (a preview, a depth map) after the photo, which is the first frame.
            if getattr(img, "is_animated", False) and img.format != "MPO":
                raise InvalidRequest(
                    field,
                    f"is an animated image ({img.n_frames} frames); send one still frame (PNG, JPEG or WebP)",
                )
            with _DECODING:
                img.load()
                if size_only:
                    turned = img.getexif().get(0x0112) in _QUARTER_TURNS  # the Orientation tag
                    return (img.height, img.width) if turned else img.size
                upright = ImageOps.exif_transpose(img) or img
                if upright.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
                    # 16-bit grey: Pillow's RGB conversion clips at 255, which turns the picture white.
                    upright = _sixteen_bit_grey(upright)
                if upright.mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in upright.info:
                    # Dropping the alpha shows what lies under transparent pixels, mostly black: a cut-out
                    # subject reached the model on black. Over white, as a page shows it.
                    rgba = upright.convert("RGBA")
                    return Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba).convert("RGB")
                return upright.convert("RGB")
    except InvalidRequest:
        raise
    except Image.DecompressionBombError as exc:
        raise InvalidRequest(field, f"has too many pixels to decode safely: {exc}") from None
    except Exception as exc:  # Pillow's decoders raise much besides OSError (NotImplementedError, struct.error…)
        if not data:
            raise InvalidRequest(field, "is empty: send a PNG, JPEG or WebP image") from None
        if isinstance(exc, Image.UnidentifiedImageError) and (other := _other_format(data)):
            raise InvalidRequest(field, f"is a {other} image; send it as PNG, JPEG or WebP") from None
        reason = "" if isinstance(exc, Image.UnidentifiedImageError) else f": {exc}"  # names the BytesIO: noise
        raise InvalidRequest(field, f"could not be decoded as an image (PNG, JPEG or WebP){reason}") from None


def _other_format(data: bytes) -> str | None:
    """The format of an image Pillow reads but the models are not given (GIF, BMP, TIFF…), from its header
    only: a refusal that names it says what to do, where "could not be decoded" reads as a damaged file."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.format
    except Exception:  # not an image at all
        return None


def _sixteen_bit_grey(img: Any) -> Any:
    """A 16-bit grey picture as 8-bit, as a viewer shows it; its transparent grey (a PNG's tRNS) kept as an
    alpha channel, which the conversion to 8 bits would drop (the picture then reached the model unwhitened)."""
    import numpy as np
    from PIL import Image

    wide = img.convert("I")
    grey = wide.point(lambda v: v / 256).convert("L")
    transparent = img.info.get("transparency")
    if not isinstance(transparent, int):
        return grey
    alpha = Image.fromarray(np.where(np.asarray(wide) == transparent, 0, 255).astype(np.uint8), "L")
    return Image.merge("LA", (grey, alpha))


def _best_output_size(image: tuple[int, int], multiple: int, area: int) -> tuple[int, int] | None:
    """Wan 2.2's `best_output_size` (wan/utils/utils.py), which its TI2V-5B pipeline sizes an image's video
    by: the width rounded first, then the height, or the other way round, whichever keeps the image's aspect
    better, each within `area` (a square photo at 1280x704's area is 960x928 there). None where a side comes
    to nothing (an image more elongated than `area` holds)."""
    ratio = image[0] / image[1]
    ow = (area * ratio) ** 0.5
    oh = area / ow
    ow1 = int(ow // multiple * multiple)
    oh2 = int(oh // multiple * multiple)
    if ow1 <= 0 or oh2 <= 0:
        return None
    oh1 = int(area / ow1 // multiple * multiple)
    ow2 = int(area / oh2 // multiple * multiple)
    if oh1 <= 0 or ow2 <= 0:
        return None
    ratio1, ratio2 = ow1 / oh1, ow2 / oh2
    if max(ratio / ratio1, ratio1 / ratio) < max(ratio / ratio2, ratio2 / ratio):
        return ow1, oh1
    return ow2, oh2


def image_shaped_size(
    image: tuple[int, int], spec: ModelSpec, width: int | None = None, height: int | None = None
) -> tuple[int, int]:
    """The video size for an input image of size `image` when the request leaves one or both sides open: the
    image's aspect ratio over the model's default area, rounded down to the model's stride as Wan's own
    generate.py does, each side at most `max_side`, the longer made smaller until the frame fits `max_pixels`;
    or the shape of the image over the side that was given, the other to the nearest stride, refused (naming
    the side given) when that frame would not fit."""
    multiple = spec.spatial_multiple
    aspect = image[1] / image[0]  # height / width
    longest = spec.max_side // multiple * multiple

    def side(value: float) -> int:
        # round first: sqrt(832*480 * 480/832) is 479.99999999999994, which floor() would cut to 464
        return min(max(multiple, math.floor(round(value, 6)) // multiple * multiple), longest)

    if width is None and height is None:
        area = spec.width * spec.height
        if spec.task_label == "ti2v":  # Wan 2.2's text+image-to-video model sizes its frame its own way
            best = _best_output_size(image, multiple, area)
            if best is not None and max(best) <= longest and best[0] * best[1] <= spec.max_pixels:
                return best
        width, height = side(math.sqrt(area / aspect)), side(math.sqrt(area * aspect))
        while width * height > spec.max_pixels and max(width, height) > multiple:  # clamped sides of a thin image
            if width >= height:
                width -= multiple
            else:
                height -= multiple
        return width, height

    def follow(given: int, ratio: float, name: str) -> int:
        """The open side for the side `name` given: the image's shape, to the nearest multiple."""
        wanted = max(multiple, math.floor(round(given * ratio + multiple / 2, 6)) // multiple * multiple)
        given_fits = 0 < given <= longest and given % multiple == 0 and given * multiple <= spec.max_pixels
        if given_fits and (wanted > longest or given * wanted > spec.max_pixels):
            # Shrinking the open side to fit would give a frame of another shape than the image (a 2:1 photo
            # made 1:4), which the crop then cuts down to a sliver of it.
            frame = f"{given}x{wanted}" if name == "width" else f"{wanted}x{given}"
            raise InvalidRequest(
                name,
                f"{given} with this {image[0]}x{image[1]} image makes a {frame} video, larger than {spec.name} "
                f"supports ({spec.max_pixels} pixels per frame, {longest} a side): "
                # The least side there is cannot be made smaller: only both sides given can help then.
                + (f"give a smaller {name}, or both" if given > multiple else "give both")
                + " width and height (the image is then cropped to fit)",
            )
        return min(wanted, longest)  # a side given wrong is named by the checks that follow

    if height is None:
        assert width is not None
        return width, follow(width, aspect, "width")
    return follow(height, 1 / aspect, "height"), height


def cover_crop(image: Any, width: int, height: int) -> Any:
    """The input image fitted to the video's `width` x `height` without distortion, as Wan 2.2's own pipeline
    does: scaled to cover it, then the middle cut out. The cut is taken from the source and only it is scaled,
    so a very thin image never grows into a huge one on the way. An image of the video's shape is left for
    diffusers' resize, so it goes through exactly the same path as in diffusers."""
    from PIL import Image

    if image.width * height == image.height * width:
        return image
    scale = max(width / image.width, height / image.height)
    # The part of the source that covers the frame, centred, in source pixels (fractional, as PIL allows). On
    # the side that fits exactly, width / (width / image.width) may come out a hair over the image (4000.0000000000005
    # for 176 over 4000), and PIL refuses a box that reaches outside it: so it is clamped to the image.
    box_width, box_height = min(width / scale, image.width), min(height / scale, image.height)
    left, top = max((image.width - box_width) / 2, 0.0), max((image.height - box_height) / 2, 0.0)
    return image.resize((width, height), Image.Resampling.LANCZOS, box=(left, top, left + box_width, top + box_height))


def resolve(
    request: GenerationRequest, spec: ModelSpec, serving: str | None = None, step_cache: bool = True
) -> GenerationRequest:
    """Fill the model's defaults and check every rule; returns a complete request or raises InvalidRequest.

    A missing seed is drawn here, so the resolved request (and the job that stores it) records it. `serving`
    (the workers' preset) and `step_cache` (whether their layout can run it) decide which `preset` a request
    may name; a request that names none keeps None and gets the workers' own.
    """
    if not isinstance(request.prompt, str) or not request.prompt.strip():
        raise InvalidRequest("prompt", "must be a non-empty string")
    if len(request.prompt) > MAX_PROMPT_CHARS:
        raise InvalidRequest("prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
    _check_unicode("prompt", request.prompt)
    if not _visible(request.prompt):
        raise InvalidRequest("prompt", "holds no visible text (only spaces, zero-width or format characters)")
    negative = request.negative_prompt
    if negative is not None:
        if not isinstance(negative, str):
            raise InvalidRequest("negative_prompt", "must be a string")
        if len(negative) > MAX_PROMPT_CHARS:
            raise InvalidRequest("negative_prompt", f"must be at most {MAX_PROMPT_CHARS} characters")
        _check_unicode("negative_prompt", negative)

    # Task: the image decides between text-to-video and image-to-video.
    image_size: tuple[int, int] | None = None
    if request.image is not None:
        if "i2v" not in spec.tasks:
            raise InvalidRequest(
                "image",
                f"{spec.name} is a text-to-video model and takes no input image (tasks: {spec.task_label})",
            )
        image_size = check_image(request.image)
    elif "t2v" not in spec.tasks:
        raise InvalidRequest("image", f"{spec.name} is an image-to-video model: an input image is required")

    multiple = spec.spatial_multiple
    width = None if request.width is None else _int("width", request.width)
    height = None if request.height is None else _int("height", request.height)
    if image_size is not None and (width is None or height is None):
        width, height = image_shaped_size(image_size, spec, width, height)
    width = spec.width if width is None else width
    height = spec.height if height is None else height
    for name, value in (("width", width), ("height", height)):
        if value <= 0:
            raise InvalidRequest(name, f"must be positive, got {value}")
        if value % multiple:
            raise InvalidRequest(
                name,
                f"must be a multiple of {multiple} (VAE stride {spec.vae_stride} × patch {spec.patch}) "
                f"for {spec.name}, got {value}",
            )
        if value > spec.max_side:
            raise InvalidRequest(
                name,
                f"must be at most {spec.max_side} for {spec.name} ({spec.max_side_patches} patches of "
                f"{multiple} px: the transformer's position table ends there), got {value}",
            )
    if width * height > spec.max_pixels:
        raise InvalidRequest(
            "size",
            f"{width}x{height} is larger than {spec.name} supports ({spec.max_pixels} pixels per frame)",
        )

    num_frames = _int("num_frames", request.num_frames if request.num_frames is not None else spec.num_frames)
    stride = spec.temporal_stride
    if num_frames < 1 or num_frames > spec.max_frames:
        raise InvalidRequest("num_frames", f"must be between 1 and {spec.max_frames}, got {num_frames}")
    if (num_frames - 1) % stride:
        raise InvalidRequest(
            "num_frames",
            f"must be {stride}k+1 (1, 5, 9, …, 81, …) for the VAE's time stride, got {num_frames}",
        )
    if num_frames > spec.rope_max_frames:
        raise InvalidRequest("num_frames", f"must be at most {spec.rope_max_frames} for {spec.name}, got {num_frames}")

    fps = _int("fps", request.fps if request.fps is not None else spec.fps)
    if not 1 <= fps <= MAX_FPS:
        raise InvalidRequest("fps", f"must be between 1 and {MAX_FPS}, got {fps}")

    steps = _int(
        "num_inference_steps",
        request.num_inference_steps if request.num_inference_steps is not None else spec.num_inference_steps,
    )
    if not 1 <= steps <= 200:
        raise InvalidRequest("num_inference_steps", f"must be between 1 and 200, got {steps}")

    guidance = _float(
        "guidance_scale",
        request.guidance_scale if request.guidance_scale is not None else spec.guidance_scale,
    )
    if not 0 <= guidance <= 30:
        raise InvalidRequest("guidance_scale", f"must be between 0 and 30, got {guidance}")
    if guidance <= 1 and isinstance(request.negative_prompt, str) and request.negative_prompt.strip():
        # Without classifier-free guidance the negative prompt is never encoded: the video would be the same
        # with any negative prompt, or none, and the client would not know it was ignored.
        raise InvalidRequest(
            "negative_prompt",
            f"takes effect only when guidance_scale is above 1 (it is {guidance:g}): raise guidance_scale, or "
            "leave negative_prompt out",
        )
    # The defaults are filled so that the resolved request passes these rules again, as the worker checks it:
    # no default negative prompt where guidance is off (it would never be encoded), and the second expert's
    # scale then off too. A job accepted here must not fail there.
    if negative is None:
        negative = "" if spec.tiny or guidance <= 1 else WAN_NEGATIVE_PROMPT

    guidance_2: float | None = None
    boundary: float | None = None
    if spec.two_experts:
        guidance_2 = _float(
            "guidance_scale_2",
            request.guidance_scale_2
            if request.guidance_scale_2 is not None
            else (spec.guidance_scale_2 if spec.guidance_scale_2 is not None and guidance > 1 else guidance),
        )
        if not 0 <= guidance_2 <= 30:
            raise InvalidRequest("guidance_scale_2", f"must be between 0 and 30, got {guidance_2}")
        if request.guidance_scale_2 is not None and guidance_2 > 1 and guidance <= 1:
            # diffusers' rule, kept so that `exact` matches it: guidance_scale alone turns guidance on, for both
            # experts. Wan's own scripts guide the second expert by itself, so users coming from them ask this.
            raise InvalidRequest(
                "guidance_scale_2",
                f"guides the second expert only when guidance_scale is above 1 (it is {guidance:g}): raise "
                "guidance_scale, or leave guidance_scale_2 out",
            )
        boundary = _float(
            "boundary_ratio",
            request.boundary_ratio if request.boundary_ratio is not None else spec.boundary_ratio,
        )
        if not 0 < boundary < 1:
            raise InvalidRequest("boundary_ratio", f"must be strictly between 0 and 1, got {boundary}")
    else:
        for name in ("guidance_scale_2", "boundary_ratio"):
            if getattr(request, name) is not None:
                raise InvalidRequest(name, f"only applies to two-expert models (Wan 2.2 A14B); {spec.name} has one")

    shift = _float("flow_shift", request.flow_shift if request.flow_shift is not None else spec.flow_shift)
    if not 0 < shift <= 100:
        raise InvalidRequest("flow_shift", f"must be greater than 0 and at most 100, got {shift}")

    if request.preset is not None:
        _check_preset(request.preset, spec, serving, step_cache)

    seed = request.seed
    if seed is None:
        seed = secrets.randbelow(2**31)
    seed = _int("seed", seed)
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest("seed", f"must be between 0 and {MAX_SEED}, got {seed}")

    return replace(
        request,
        prompt=request.prompt,
        negative_prompt=negative,
        width=width,
        height=height,
        num_frames=num_frames,
        fps=fps,
        num_inference_steps=steps,
        guidance_scale=guidance,
        guidance_scale_2=guidance_2,
        boundary_ratio=boundary,
        flow_shift=shift,
        seed=seed,
    )
