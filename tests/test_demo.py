"""`make demo` end to end: `python -m examples.demo` against a fresh broker it serves itself."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
@pytest.mark.servers
@pytest.mark.timeout(400)
def test_the_demo_ends_with_the_rogue_agent_quarantined_and_how_to_review(
    tmp_path: Path,
) -> None:
    home = tmp_path / "demo"
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}
    done = subprocess.run(
        [sys.executable, "-m", "examples.demo", "--dir", str(home), "--no-wait"],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=360,
        check=False,
    )
    out = done.stdout
    assert done.returncode == 0, out + done.stderr
    assert "good agent: as expected" in out
    assert "delegating agent: as expected" in out
    assert "rogue: " in out
    assert re.search(r"denied \(constraint-violated\); decision dec_\w+", out)
    assert "old token -> HTTP 401" in out
    assert "new token request -> access_denied" in out
    assert re.search(r"rogue-agent status: quarantined \(detector probing", out)
    assert "rogue agent stopped: as expected" in out
    review = out[out.index("=== review what happened ===") :]
    config = str(home / "broker.toml")
    for command in ("sessions list", "sessions show", "sessions verify"):
        assert f"broker {command}" in review
        assert config in review
    assert re.search(r"review page: http://127\.0\.0\.1:\d+/review", review)
    assert re.search(r"reviewer token: bat_\S+", review)
    assert out.rstrip().endswith("broker stopped")
