"""wanserve: serve the Wan 2.1 / 2.2 video-generation models."""

__version__ = "0.1.0"
