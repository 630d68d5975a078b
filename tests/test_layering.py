"""The core never imports verl, Ray or vLLM (it must stay testable in milliseconds on CPU)."""

import subprocess
import sys


def test_core_imports_no_framework():
    code = (
        "import sys, ta_opd, ta_opd.demo\n"
        "bad = [m for m in ('verl', 'ray', 'vllm') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
