"""The request bodies as OpenAPI sees them, for `/docs` and `/openapi.json`.

The routes read their raw bodies (JSON or multipart, with the SDK's flattened keys and string numbers), and
`resolve` judges every value, so these models only describe; tests keep their fields equal to what each
route accepts.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from wanserve.request import MAX_PROMPT_CHARS, MAX_SEED

from .submit import MAX_PRIORITY, MIN_PRIORITY


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class WanFields(_Strict):
    """Wan's generation parameters, under vLLM-Omni's names; omitted ones take the model's defaults."""

    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    num_inference_steps: int | None = Field(None, ge=1, le=200)
    guidance_scale: float | None = Field(None, ge=0, le=30)
    guidance_scale_2: float | None = Field(None, ge=0, le=30, description="two-expert (A14B) models only")
    boundary_ratio: float | None = Field(None, gt=0, lt=1, description="two-expert (A14B) models only")
    flow_shift: float | None = Field(None, gt=0, le=100)
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="drawn and reported when omitted")
    fps: int | None = Field(None, ge=1, le=60)
    num_frames: int | None = Field(None, description="4k+1; wins over seconds; limits in GET /v1/models")
    width: int | None = Field(None, description="wins over size; multiple and limits in GET /v1/models")
    height: int | None = Field(None, description="wins over size")
    preset: Literal["exact", "fast", "fastest"] | None = Field(None, description="omitted: the workers' own")
    priority: int | None = Field(None, ge=MIN_PRIORITY, le=MAX_PRIORITY, description="higher runs first")


class VideoCreate(WanFields):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
    model: str | None = Field(
        None,
        description="a served model's name or alias; omitted: the first served that does the task (an image: "
        "image-to-video)",
    )
    seconds: str | float | None = Field(None, description='e.g. "4": the nearest valid frame count at the fps')
    size: str | None = Field(None, description='"WIDTHxHEIGHT", e.g. "832x480"')
    input_reference: dict[str, str] | str | None = Field(
        None, description='the first frame: {"image_url": "data:image/png;base64,…"} or that data URL'
    )
    user: str | None = Field(None, description="accepted and ignored")


class OlderNames(WanFields):
    """The names the replaced systems' examples use, taken as the newer ones."""

    image_size: str | None = Field(None, description='the size, as "WIDTH*HEIGHT" (their name)')
    infer_steps: int | None = Field(None, ge=1, le=200, description="num_inference_steps (their name)")
    sample_shift: float | None = Field(None, gt=0, le=100, description="flow_shift (their name)")
    use_attentioncache: bool | None = Field(
        None, description="false only: the step cache is chosen with `preset` (their per-step fields mean nothing)"
    )
    start_step: int | None = Field(None, description="taken and unused: their step cache's first step")
    end_step: int | None = Field(None, description="taken and unused: their step cache's last step")
    attentioncache_interval: int | None = Field(None, description="taken and unused: their step cache's interval")
    sample_solver: str | None = Field(None, description='"unipc" only: the sampler every model here uses')


class VideoSubmit(OlderNames):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    image_url: str | None = Field(None, description="a data: URL")
    size: str | None = Field(None, description='"WIDTHxHEIGHT" or "WIDTH*HEIGHT"')


class TaskGenerate(OlderNames):
    prompt: str = Field(..., max_length=MAX_PROMPT_CHARS)
    model: str | None = None
    image_url: str | None = Field(None, description="a data: URL")
    resolution: str | None = Field(None, description='"WIDTH*HEIGHT", e.g. "1280*704"')
    task_type: str | None = Field(
        None,
        description="t2v, i2v or ti2v; or Wan's task name (t2v-A14B, i2v-A14B, ti2v-5B, t2v-14B, t2v-1.3B, i2v-14B)",
    )


class RequestId(_Strict):
    requestId: str = Field(..., description="the id /video/submit returned")  # their name, camelCase


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def json_or_form_body(model: type[BaseModel]) -> dict[str, Any]:
    """JSON, or the multipart form the openai SDK sends, where the image may be a file."""
    schema = model.model_json_schema()
    file = {"type": "string", "format": "binary", "description": "the first frame, as a file"}
    form = {**schema, "properties": {**schema["properties"], "input_reference": file}}
    content = {"application/json": {"schema": schema}, "multipart/form-data": {"schema": form}}
    return {"requestBody": {"required": True, "content": content}}


def idempotent(extra: dict[str, Any]) -> dict[str, Any]:
    """A create route's `openapi_extra`, with the `Idempotency-Key` header it takes (docs/api.md)."""
    header = {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "sent again with the same request within 24 h, answers with the job the first send made",
        "schema": {"type": "string", "minLength": 1, "maxLength": 255},
    }
    return {**extra, "parameters": [header]}
