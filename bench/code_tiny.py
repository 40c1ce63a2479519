"""The tiny code task end to end (``configs/code-tiny.yaml``), one run per seed (``bench/seed_runs.py``):
held-out and validation Pass@1 / Pass@8, wall seconds, generate vs verify seconds per step, the programs each
sandbox backend ran. Writes bench/results/code_tiny.json.
Usage: python bench/code_tiny.py [--seeds 0 1 2] [--resume] [--set section.field=value ...]
"""

from __future__ import annotations

from seed_runs import main

if __name__ == "__main__":
    main(config="configs/code-tiny.yaml", name="code_tiny")
