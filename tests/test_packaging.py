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


PRODUCT = ("common", "preprocessing", "dali_pipes", "model", "training", "inference", "demo")


def imported_modules(folders) -> dict[str, set[str]]:
    """module imported (absolute imports only) -> the files under ``folders`` that import it."""
    import ast
    out: dict[str, set[str]] = {}
    for folder in folders:
        for path in (REPO / folder).glob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
                for name in names:
                    out.setdefault(name, set()).add(f"{folder}/{path.name}")
    return out


def requirements(group: str | None = None) -> set[str]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = project["dependencies"] if group is None else project["optional-dependencies"][group]
    return {Requirement(d).name.lower() for d in listed}


def distributions_imported(folders) -> tuple[set[str], dict[str, list[str]]]:
    """(the distributions the code under ``folders`` imports, {module: files} of imports no distribution owns)."""
    import sys
    from importlib.metadata import packages_distributions
    owners = packages_distributions()
    ours = {*PRODUCT, "benchmarks", "tests"}
    used, unowned = set(), {}
    for module, files in imported_modules(folders).items():
        top = module.split(".")[0]
        if top in sys.stdlib_module_names or top in ours:
            continue
        if module.startswith("torch.utils.tensorboard"):  # torch's writer, tensorboard's code
            used.add("tensorboard")
        dists = {d.lower() for d in owners.get(top, [])} or ({"nvidia-dali-cuda130"} if top == "wds2idx" else set())
        listed = requirements() | requirements("bench")
        if len(dists) > 1 and dists & listed:  # a namespace many share (nvidia): the listed one among them
            dists &= listed
        used |= dists
        if not dists:
            unowned[module] = sorted(files)
    return used, unowned


def test_runtime_dependencies_are_what_the_product_imports():
    """The Docker image installs [project.dependencies] only: the product must import nothing else (an image once
    stopped with "No module named 'skimage'"), and each of them must be imported by the product or needed by
    another of them (timm's torchvision), not carried for a benchmark."""
    from importlib.metadata import requires
    declared = requirements()
    used, unowned = distributions_imported(PRODUCT)
    assert not unowned, f"imported by the product, installed by nothing: {unowned}"
    assert used <= declared, f"imported by the product but not in [project.dependencies]: {used - declared}"
    needed = {Requirement(r).name.lower() for dist in declared for r in requires(dist) or [] if "extra ==" not in r}
    assert declared <= used | needed, f"declared but neither imported nor needed: {declared - used - needed}"


def test_the_benchmarks_import_the_product_s_dependencies_and_their_extra():
    used, unowned = distributions_imported(("benchmarks", "scripts"))
    assert not unowned, unowned
    assert used <= requirements() | requirements("bench"), used - requirements() - requirements("bench")
    assert requirements("bench") <= used  # each extra is there for a benchmark that imports it


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


def test_the_default_image_carries_what_the_gpu_check_imports():
    """README step 4 runs the GPU check in the image built without any build argument: its default extras must
    hold every third-party package the check imports, itself or through the benchmarks' modules it uses."""
    arg = next(line for line in dockerfile_lines() if line.startswith("ARG EXTRAS"))
    extras = [e for e in arg.split("=", 1)[1].strip('"').split(",") if e]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    installed = {Requirement(d).name.lower() for d in project["dependencies"]}
    for extra in extras:
        installed |= {Requirement(d).name.lower() for d in project["optional-dependencies"][extra]}
    imports = imported_modules(["benchmarks"])
    needed = {name.split(".")[0] for name, files in imports.items()
              if files & {"benchmarks/gpu_check.py", "benchmarks/harness.py", "benchmarks/photos.py"}}
    third_party = {n for n in needed if n not in ("benchmarks", *PRODUCT) and not __import__("sys").stdlib_module_names
                   .__contains__(n)}
    distribution = {"skimage": "scikit-image", "cv2": "opencv-python-headless", "yaml": "pyyaml", "PIL": "pillow",
                    "nvidia": "nvidia-dali-cuda130"}
    missing = {n for n in third_party if distribution.get(n, n).lower() not in installed}
    assert not missing, f"the default image lacks {missing} (EXTRAS={extras})"
