"""The documentation builds without a warning (a broken link or anchor, a page missing from the
nav or a nav entry without its page fails; mkdocs.yml sets the validation), and the README and
CONTRIBUTING, read on GitHub outside the site, link to files that exist."""
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_site_builds_strict(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}  # Material's end-of-life banner
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    output = build.stdout + build.stderr
    assert build.returncode == 0, f"mkdocs build --strict failed:\n{output}"
    assert "WARNING" not in output, output
    cli_page = (tmp_path / "site" / "cli" / "index.html").read_text()
    assert "fat-mlflow stage1" in cli_page and "--resume-run-id" in cli_page, (
        "the CLI reference was not generated from the click commands")


def test_readme_and_contributing_link_to_files_that_exist() -> None:
    """They are read on GitHub, outside the site: their relative links must hold there."""
    for name in ("README.md", "CONTRIBUTING.md"):
        text = (REPO / name).read_text()
        targets = re.findall(r"\]\(([^)\s]+)\)", text)
        local = [t.split("#")[0] for t in targets if not t.startswith(("http://", "https://", "#"))]
        missing = [t for t in local if not (REPO / t).exists()]
        assert not missing, f"{name} links to files that do not exist: {missing}"
