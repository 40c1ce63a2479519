"""Logging set-up shared by the coordinator and the actors (one format, level from LPO_LOG_LEVEL)."""

from __future__ import annotations

import logging
import os


def setup_logging(component: str) -> logging.Logger:
    """Configure the root logger once per process and return the component's logger."""
    level = os.environ.get("LPO_LOG_LEVEL", "INFO").upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(
            level=level, format=f"%(asctime)s {component} %(levelname)s %(name)s: %(message)s"
        )
    else:
        root.setLevel(level)
    for noisy in ("vllm", "deepspeed", "ray", "urllib3", "httpx"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    return logging.getLogger(f"lpo.{component}")
