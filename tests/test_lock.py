"""The lock (constraints.txt) that the README's set-up and CI install through."""
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def locked_versions() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: {line!r} is not a NAME==VERSION pin"
            pins[canonicalize_name(name)] = Version(version)
    return pins


def test_every_declared_dependency_is_locked_within_its_range():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = project["dependencies"] + [
        spec for extra in project["optional-dependencies"].values() for spec in extra]
    pins = locked_versions()
    for spec in map(Requirement, declared):
        name = canonicalize_name(spec.name)
        assert name in pins, f"{spec.name} is declared in pyproject.toml but not locked"
        assert spec.specifier.contains(pins[name], prereleases=True), (
            f"the lock has {spec.name}=={pins[name]}, outside pyproject's range {spec}")


def test_torch_is_locked_without_a_local_label_so_a_cuda_build_fits():
    assert locked_versions()["torch"].local is None


def test_readme_set_up_and_ci_install_through_the_lock():
    readme = (REPO / "README.md").read_text()
    set_up = re.search(r"```bash\n(.+?)\n(.+?)\n```", readme)
    install, test = set_up.groups()
    assert install.startswith("pip install -c constraints.txt torch==2.13.0 -e")
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines()
          if line and not line.startswith(("#", "set ", "cd "))]
    assert ci == [install.split(" && ")[0], test]
