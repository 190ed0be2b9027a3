"""What can be checked of the Docker image and the install without Docker."""
import re
import tomllib

import yaml
from packaging.requirements import Requirement

from tests.fixtures import REPO


def dockerfile_lines() -> list[str]:
    text = (REPO / "Dockerfile").read_text()
    return [line.strip() for line in text.replace("\\\n", " ").splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_parses_into_known_instructions():
    known = {"FROM", "ENV", "RUN", "WORKDIR", "COPY", "VOLUME", "CMD", "ARG", "LABEL", "EXPOSE"}
    lines = dockerfile_lines()
    assert lines[0].startswith("FROM ")
    for line in lines:
        assert line.split()[0] in known, line


def test_dockerfile_pins_agree_with_pyproject():
    deps = {Requirement(d).name: Requirement(d) for d in
            tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    pins = dict(re.findall(r"([A-Za-z0-9_.-]+)==([^\s]+)", " ".join(l for l in dockerfile_lines() if "pip install" in l)))
    for name in ("torch", "torchvision", "nvidia-dali-cuda130", "timm"):
        assert name in pins, f"{name} is not pinned in the Dockerfile"
        assert deps[name].specifier.contains(pins[name]), f"{name}=={pins[name]} breaks pyproject's {deps[name]}"


def test_docker_volumes_are_the_config_paths():
    paths = yaml.safe_load((REPO / "config.yaml").read_text())["paths"]
    volume = next(l for l in dockerfile_lines() if l.startswith("VOLUME"))
    mounted = set(re.findall(r'"([^"]+)"', volume))
    assert mounted == set(paths.values())


def test_ci_runs_the_readme_test_command():
    assert "make test" in (REPO / ".ci" / "run").read_text()
    assert "make test" in (REPO / "README.md").read_text()
