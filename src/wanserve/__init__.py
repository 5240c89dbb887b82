"""wanserve: serve the Wan 2.1 / 2.2 video-generation models."""

__version__ = "0.1.0"


def _quiet_torchvision_advice() -> None:
    """transformers warns, at every process's first image processor, that CLIPImageProcessor "requires
    torchvision" and falls back to its PIL twin, which is what the Wan I2V pipelines use anyway. The advice to
    install torchvision would have pip replace the pinned torch with another build and its CUDA wheels."""
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision (not installed)" not in record.getMessage()
    )


_quiet_torchvision_advice()
