"""Project hygiene: the README's set-up commands are the ones CI runs, and the package imports offline."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up on a fresh machine", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section)


def test_readme_shows_exactly_two_setup_commands():
    commands = _readme_commands()
    assert len(commands) == 2
    main_job, tests = commands
    assert "pip install torch==2.13.0" in main_job and "kvcache-" in main_job
    assert tests.endswith("python -m pytest")


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert _readme_commands()[1] in ci


def test_main_job_entry_point_is_declared():
    pyproject = (ROOT / "pyproject.toml").read_text()
    command = _readme_commands()[0].rsplit("&& ", 1)[1].split()[0]
    assert re.search(rf"^{re.escape(command)} = ", pyproject, re.M), command


def test_import_needs_no_network_and_changes_nothing_global():
    code = (
        "import socket\n"
        "def refuse(*a, **k): raise RuntimeError('network access at import')\n"
        "socket.socket.connect = refuse\n"
        "from transformers.modeling_utils import AttentionInterface\n"
        "before = dict(AttentionInterface._global_mapping)\n"
        "import kvcache_plugins\n"
        "assert dict(AttentionInterface._global_mapping) == before\n"
        "print(kvcache_plugins.__version__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip()


def test_changelog_follows_keep_a_changelog():
    text = (ROOT / "CHANGELOG.md").read_text()
    assert text.startswith("# Changelog")
    assert "## [Unreleased]" in text
    assert "keepachangelog.com" in text
