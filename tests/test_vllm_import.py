"""kvuring.vllm without vLLM: a clear ImportError that names the extra to install.

Runs in every environment: where vLLM is installed, its absence is simulated.
"""

from __future__ import annotations

import subprocess
import sys


def test_import_without_vllm_names_the_extra() -> None:
    code = (
        "import sys\n"
        "sys.modules['vllm'] = None  # as if vLLM were not installed\n"
        "try:\n"
        "    import kvuring.vllm\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'kvuring[vllm]'" in out.stdout, out
    assert "imported" not in out.stdout


def test_kvuring_itself_does_not_import_vllm() -> None:
    code = "import sys, kvuring, kvuring.poll; print('vllm' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
