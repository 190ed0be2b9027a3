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


RUNTIME_FOLDERS = ("common", "preprocessing", "dali_pipes", "model", "training", "inference", "demo", "scripts")


def imported_top_level_modules() -> dict[str, set[str]]:
    """top-level module -> the non-test files that import it (absolute imports only)."""
    import ast
    out: dict[str, set[str]] = {}
    for folder in RUNTIME_FOLDERS:
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    out.setdefault(name.split(".")[0], set()).add(f"{folder}/{path.name}")
    return out


def test_runtime_code_imports_only_runtime_dependencies():
    """Scripts, the demo and the benchmarks run in the Docker image, which installs [project.dependencies] only
    (an image once stopped with "No module named 'skimage'")."""
    import sys
    from importlib.metadata import packages_distributions, requires
    project = {*RUNTIME_FOLDERS, "tests"} | {p.stem for p in (REPO / "scripts").glob("*.py")}
    declared = {Requirement(d).name.lower() for d in
                tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]}
    # what a dependency itself requires is installed with it (wds2idx and nvidia.* come with DALI, ...)
    provided = set(declared)
    for dist in declared:
        provided |= {Requirement(r).name.lower() for r in requires(dist) or [] if "extra ==" not in r}
    owners = packages_distributions()
    missing = {}
    for module, files in imported_top_level_modules().items():
        if module in sys.stdlib_module_names or module in project:
            continue
        dists = {d.lower() for d in owners.get(module, [])}
        if not dists & declared and not (module == "wds2idx" and "nvidia-dali-cuda130" in declared):
            missing[module] = sorted(files)
    assert not missing, f"imported but not in [project.dependencies]: {missing}"
    assert provided >= declared


def test_dockerfile_has_a_compiler_the_hardware_jpeg_decoder_and_the_tested_dali():
    text = " ".join(dockerfile_lines())
    apt = " ".join(l for l in dockerfile_lines() if "apt-get install" in l).split()
    assert {"gcc", "python3-dev"} <= set(apt), "Triton compiles its launcher for model.compile"
    capabilities = re.search(r"NVIDIA_DRIVER_CAPABILITIES=(\S+)", text)
    assert capabilities and "video" in capabilities.group(1).split(","), "nvJPEG's hardware decoder needs video"


def test_dali_is_pinned_to_its_tested_minor_version():
    from importlib.metadata import version
    from packaging.version import Version
    dali = next(Requirement(d) for d in tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
                if d.startswith("nvidia-dali"))
    tested = Version(version(dali.name))
    assert dali.specifier.contains(tested)
    assert not dali.specifier.contains(f"{tested.major}.{tested.minor + 1}.0")
