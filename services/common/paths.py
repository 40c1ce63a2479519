"""Where the project keeps its caches (models, compiled kernels, HF files).

Everything heavy lives under one project-local folder so that runs, tests and CI never write to the
user's home and never reach for a hub: ``$LPO_CACHE_DIR`` when set, else ``<repo>/.cache``.
"""

from __future__ import annotations

import os
from pathlib import Path

_REPO_ROOT = Path(__file__).resolve().parents[2]

# Cache variables of the libraries we import, each mapped to a sub-folder of the project cache
# (the same layout the Makefile exports).
_CACHE_ENV = {
    "TORCHINDUCTOR_CACHE_DIR": "inductor",
    "VLLM_CACHE_ROOT": "vllm",
    "TORCH_EXTENSIONS_DIR": "torch_extensions",
    "HF_HOME": "hf",
    "TRITON_CACHE_DIR": "triton",
}


def project_cache_dir() -> Path:
    """The project cache root: ``$LPO_CACHE_DIR`` if set, else ``<repo>/.cache`` (not created here)."""
    env = os.environ.get("LPO_CACHE_DIR")
    return Path(env).expanduser().resolve() if env else _REPO_ROOT / ".cache"


def set_cache_env() -> None:
    """Point the torch / vLLM / HF / Triton caches into the project cache unless already set.

    Call before importing vllm or transformers: some of them read these variables at import time.
    The Makefile exports the same values, so this only fills gaps (tests, ad-hoc scripts).
    """
    root = project_cache_dir()
    for var, sub in _CACHE_ENV.items():
        os.environ.setdefault(var, str(root / sub))
