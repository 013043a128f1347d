"""diffusiond: a hot-folder daemon for Stable Diffusion (see README.md)."""

__version__ = "0.1.0"
