"""The ``gpu`` marker: tests carrying it are skipped with the reason where CUDA is missing, run where not
(the hook in tests/conftest.py, exercised on a throwaway suite in a pytest subprocess)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import torch

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"


def test_gpu_tests_skip_with_the_reason_only_without_cuda(tmp_path: Path) -> None:
    shutil.copy(CONFTEST, tmp_path / "conftest.py")
    (tmp_path / "test_suite.py").write_text(
        "import pytest\n\n\n@pytest.mark.gpu\ndef test_on_gpu():\n    pass\n\n\n"
        "def test_on_cpu():\n    pass\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-rs", "-p", "no:cacheprovider", "-o", "markers=gpu: CUDA", "."],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if torch.cuda.is_available():
        assert "2 passed" in proc.stdout, proc.stdout
    else:
        assert "1 passed, 1 skipped" in proc.stdout, proc.stdout
        assert "SKIPPED [1] test_suite.py:4: needs a CUDA GPU" in proc.stdout, proc.stdout
