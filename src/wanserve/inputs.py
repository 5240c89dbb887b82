"""A job's input image is kept in the result storage (`<job_id>/input`), and its record names it (`image_key`).

Records are read whole by every status call and list page, and a 20 MiB image is 27 MB of base64: kept in
the record, a list of a hundred image jobs read gigabytes, and each Redis reply or retry token copied it. The
storage is shared by the API and the workers already, and a job's files there go when the job does.
"""

from __future__ import annotations

from typing import Any

from wanserve.errors import WanserveError
from wanserve.request import GenerationRequest
from wanserve.storage.base import INPUT, Storage, key_for, put_bytes, read_bytes


class InputMissing(WanserveError, LookupError):
    """A job's input image is no longer in the storage (removed by hand, or lost with the storage)."""


def store_request(request: GenerationRequest, job_id: str, storage: Storage) -> dict[str, Any]:
    """The record form of a resolved `request`: its input image, if any, uploaded and named by key."""
    data = request.to_dict()
    if request.image is not None:
        key = key_for(job_id, INPUT)
        put_bytes(storage, key, bytes(request.image))
        del data["image"]
        data["image_key"] = key
    return data


def load_request(data: dict[str, Any], storage: Storage) -> GenerationRequest:
    """The request a record holds, its input image read back from the storage. Records written before images
    moved out (`image` as base64) still load."""
    key = data.get("image_key")
    if key is None:
        return GenerationRequest.from_dict(data)
    image = read_bytes(storage, key)
    if image is None:
        raise InputMissing(f"the input image ({key}) is no longer in the storage")
    return GenerationRequest.from_dict({**data, "image": image})
