"""The README's newcomer path (tests/walkthrough.sh) runs end to end without a traceback or a wrong exit code."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_the_readme_walkthrough_runs(tmp_path):
    pytest.importorskip("tensorflow")
    if not shutil.which("curl"):
        pytest.skip("curl is needed to call the service")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    script = Path(__file__).with_name("walkthrough.sh")
    out = subprocess.run(["bash", str(script), str(tmp_path / "w")], capture_output=True, text=True, env=env, timeout=1800)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
