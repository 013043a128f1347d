"""diffusiond: a hot-folder daemon for Stable Diffusion (see README.md)."""

import os

__version__ = "0.1.0"

# Offline always: set before any submodule can import huggingface_hub, diffusers or
# transformers, which read these once at import. A hub is never contacted.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
