"""The pack loads the way ComfyUI loads it, fast, and the engine never imports ComfyUI."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from importlib import metadata
from pathlib import Path
from xml.etree import ElementTree

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: pytest's own dependency
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]

LOADER = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location({name!r}, {init!r}, submodule_search_locations=[{root!r}])
module = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = module
spec.loader.exec_module(module)
heavy = ("torch", "diffusers", "transformers", "numpy", "PIL", "cv2", "librosa", "av", "huggingface_hub")
print(sorted(m for m in heavy if m in sys.modules))
print(type(module.NODE_CLASS_MAPPINGS).__name__, type(module.NODE_DISPLAY_NAME_MAPPINGS).__name__)
"""


def test_pack_imports_like_comfyui_without_heavy_modules():
    # ComfyUI names the module after the pack's absolute path, with dots replaced
    name = str(ROOT).replace(".", "_x_")
    code = LOADER.format(name=name, init=str(ROOT / "__init__.py"), root=str(ROOT))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    # what makes ComfyUI's start slow is importing the numerical stack: none of it is imported here (no
    # wall-clock assertion: timing on a shared machine is noise)
    assert out[0] == "[]"
    assert out[1] == "dict dict"


def test_engine_has_no_comfyui_imports():
    for path in (ROOT / "sonic").rglob("*.py"):
        text = path.read_text()
        for banned in ("import comfy", "from comfy", "import folder_paths", "import server", "from nodes"):
            assert banned not in text, f"{path} imports ComfyUI ({banned})"


def test_engine_import_is_light():
    code = "import sys, sonic; print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"


# --- Comfy Registry rules (docs.comfy.org/registry/standards) and metadata (registry/specifications) ---------------

# What the pack ships and runs: the node entry point, the nodes, the engine and the workflow builder
SHIPPED_SOURCES = ("__init__.py", "nodes", "sonic", "workflows")
PIP_WORDS = re.compile(r"^(pip|pip3|ensurepip)$|(^|\s|/)pip3?\s+(install|uninstall)\b|-m\s+pip\b")
RUNNERS = ("subprocess.", "os.exec", "os.spawn", "os.posix_spawn", "asyncio.create_subprocess_", "Popen", "run",
           "check_call", "check_output", "call")
SHELL_CALLS = {("os", "system"), ("os", "popen"), ("subprocess", "getoutput"), ("subprocess", "getstatusoutput")}


def _dotted(node: ast.AST) -> str:
    """`a.b.c` for a Name/Attribute chain, else ''."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return ""


def _strings(node: ast.AST):
    for sub in ast.walk(node):
        if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
            yield sub.value


def registry_findings(path: Path, text: str, label: str | None = None) -> list[str]:
    """`file:line: what` for each thing the registry forbids or flags: eval/exec, compile() of source text, shell=True
    and shell-running calls, a pip install at run time (pip in a command, `import pip`, `pip.main`), and several
    statements on one line (ruff E702, which `comfy node validate` reports)."""
    label = label or str(path)
    found = []
    tree = ast.parse(text, filename=label)
    for node in ast.walk(tree):
        where = f"{label}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Call):
            name = _dotted(node.func)
            if name in ("eval", "exec", "builtins.eval", "builtins.exec"):
                found.append(f"{where}: {name}()")
            elif name in ("compile", "builtins.compile"):
                found.append(f"{where}: compile() of source text")
            elif name == "__import__" and node.args and not isinstance(node.args[0], ast.Constant):
                found.append(f"{where}: __import__ of a computed name")
            if tuple(name.rsplit(".", 1)) in SHELL_CALLS:
                found.append(f"{where}: {name}() runs a shell")
            for keyword in node.keywords:
                if keyword.arg == "shell" and not (isinstance(keyword.value, ast.Constant) and not keyword.value.value):
                    found.append(f"{where}: shell=True")
            if name.endswith(("pip.main", "_internal.main")):
                found.append(f"{where}: {name}() installs packages at run time")
            runs_process = name.startswith(RUNNERS) or name in ("os.system", "os.popen")
            if runs_process and any(PIP_WORDS.search(s) for arg in node.args for s in _strings(arg)):
                found.append(f"{where}: {name}() runs pip")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            if any(n.split(".")[0] in ("pip", "ensurepip") for n in names):
                found.append(f"{where}: imports pip")
    for body in (getattr(n, field) for n in ast.walk(tree) for field in ("body", "orelse", "finalbody")
                 if isinstance(getattr(n, field, None), list)):
        lines = [s.lineno for s in body if isinstance(s, ast.stmt)]
        found += [f"{label}:{line}: several statements on one line" for line in sorted(set(lines))
                  if lines.count(line) > 1]
    return found


def shipped_python_files() -> list[Path]:
    files = []
    for entry in SHIPPED_SOURCES:
        path = ROOT / entry
        files += [path] if path.is_file() else sorted(path.rglob("*.py"))
    return files


def test_shipped_sources_follow_registry_rules():
    files = shipped_python_files()
    assert len(files) > 50 and ROOT / "nodes" / "sampling.py" in files
    findings = [f for path in files for f in registry_findings(path, path.read_text(), str(path.relative_to(ROOT)))]
    assert findings == []


BAD_SOURCE = """\
import subprocess, sys, os
import pip
value = eval("1 + 1")
exec("x = 1")
code = compile("x = 2", "<s>", "exec")
subprocess.run("ls -l", shell=True)
subprocess.check_call([sys.executable, "-m", "pip", "install", "requests"])
os.system("pip install requests")
pip.main(["install", "requests"])
a = 1; b = 2
subprocess.run(["ffmpeg", "-version"], shell=False)
import re; pattern = re.compile("pip")
"""


def test_registry_scan_names_each_violation_with_its_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text(BAD_SOURCE)
    findings = registry_findings(bad, BAD_SOURCE, "bad.py")
    assert sorted(findings) == sorted([
        "bad.py:2: imports pip",
        "bad.py:3: eval()",
        "bad.py:4: exec()",
        "bad.py:5: compile() of source text",
        "bad.py:6: shell=True",
        "bad.py:7: subprocess.check_call() runs pip",
        "bad.py:8: os.system() runs a shell",
        "bad.py:8: os.system() runs pip",
        "bad.py:9: pip.main() installs packages at run time",
        "bad.py:10: several statements on one line",
        "bad.py:12: several statements on one line",
    ])


def pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_registry_metadata_is_complete():
    project, comfy = pyproject()["project"], pyproject()["tool"]["comfy"]
    # node id: < 100 chars of [A-Za-z0-9._-], starts with a letter, no two specials in a row, no "ComfyUI"
    assert re.fullmatch(r"[A-Za-z](?:[A-Za-z0-9]|[._-](?=[A-Za-z0-9]))*", project["name"]) and len(project["name"]) < 100
    assert "comfyui" not in project["name"].lower()
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # X.Y.Z
    assert project["description"].strip()
    assert project["license"] == "MIT" and (ROOT / "LICENSE").read_text().startswith("MIT License")
    repository = project["urls"]["Repository"]
    owner_repo = re.fullmatch(r"https://github\.com/([\w.-]+/[\w.-]+)", repository).group(1)
    assert re.fullmatch(r"[a-z][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"] == "Sonic Portrait"
    # the icon is this repository's icon.svg, served raw from the default branch: square, at most 400 x 400
    icon = re.fullmatch(rf"https://raw\.githubusercontent\.com/{re.escape(owner_repo)}/main/(.+)", comfy["Icon"])
    assert icon and icon.group(1).endswith((".svg", ".png", ".jpg", ".gif"))
    svg = ElementTree.parse(ROOT / icon.group(1)).getroot()
    assert svg.tag == "{http://www.w3.org/2000/svg}svg"
    assert svg.get("width") == svg.get("height") and int(svg.get("width")) <= 400
    assert subprocess.run(["git", "ls-files", "--error-unmatch", icon.group(1)], cwd=ROOT, capture_output=True,
                          check=False).returncode == 0
    assert comfy["includes"] == []  # nothing git-ignored is needed (see .comfyignore for what is left out)
    # the version range in the format comfy-cli accepts, and it admits both tested ComfyUI releases
    from packaging.specifiers import SpecifierSet

    assert re.fullmatch(r"(?:(==|>=|<=|!=|~=|>|<)\s*\d+\.\d+\.\d+)(?:\s*,\s*(==|>=|<=|!=|~=|>|<)\s*\d+\.\d+\.\d+)*",
                        comfy["requires-comfyui"])
    assert all(v in SpecifierSet(comfy["requires-comfyui"]) for v in ("0.8.0", "0.18.2"))
    assert "0.7.0" not in SpecifierSet(comfy["requires-comfyui"])


def _requirement_names(lines) -> dict[str, str]:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    reqs = [Requirement(line.split("#")[0]) for line in lines if line.split("#")[0].strip()]
    return {canonicalize_name(r.name): str(r.specifier) for r in reqs}


def _runtime_imports() -> dict[str, list[str]]:
    """Top-level names of the absolute imports reachable from the pack's __init__.py through its relative imports
    (what ComfyUI can end up importing when the nodes run) -> where each is imported."""
    def module_file(parts):
        base = ROOT.joinpath(*parts)
        return next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)

    todo, seen, imports = [ROOT / "__init__.py"], set(), {}
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        package = parts[:-1]  # a module's package; for __init__ the package itself
        for node in ast.walk(ast.parse(path.read_text())):
            where = f"{path.relative_to(ROOT)}:{node.lineno}" if hasattr(node, "lineno") else ""
            if isinstance(node, ast.ImportFrom) and node.level:
                module = package[:len(package) - node.level + 1] + (node.module.split(".") if node.module else [])
                todo += [f for f in [module_file(module[:i]) for i in range(1, len(module) + 1)]
                         + [module_file(module + [a.name]) for a in node.names] if f]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    imports.setdefault(alias.name.split(".")[0], []).append(where)
            elif isinstance(node, ast.ImportFrom):
                imports.setdefault(node.module.split(".")[0], []).append(where)
    assert ROOT / "sonic" / "engine" / "pipeline.py" in seen and ROOT / "sonic" / "post" / "video_io.py" in seen
    return imports


# ComfyUI's process provides these: its own modules, and torch/torchvision/aiohttp from its requirements.txt
COMFYUI_PROVIDES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server", "nodes",
                    "node_helpers", "latent_preview", "torch", "torchvision", "torchaudio", "aiohttp"}


def test_requirements_txt_is_what_the_nodes_need_and_never_torch():
    requirements = _requirement_names((ROOT / "requirements.txt").read_text().splitlines())
    assert not {"torch", "torchvision", "torchaudio"} & set(requirements), "would replace ComfyUI's torch build"
    # the same pins as the package, less the torch stack ComfyUI brings
    package = _requirement_names(pyproject()["project"]["dependencies"])
    assert requirements == {k: v for k, v in package.items() if k not in ("torch", "torchvision")}
    # every third-party module the nodes can import comes from a listed requirement (or from ComfyUI itself)
    provided = {}
    for name in requirements:
        for file in metadata.distribution(name).files or []:
            top = file.parts[0]
            if not top.endswith((".dist-info", ".data")) and top != "..":
                provided.setdefault(top.split(".")[0], name)
    missing = {module: where[0] for module, where in _runtime_imports().items()
               if module not in sys.stdlib_module_names and module not in COMFYUI_PROVIDES and module not in provided
               and module != "__future__"}
    assert missing == {}


def _clean_clone(dest: Path) -> Path:
    """A clone of this checkout's HEAD (the committed pack, as a user or the registry gets it)."""
    subprocess.run(["git", "clone", "--quiet", "--no-hardlinks", str(ROOT), str(dest)], check=True)
    return dest


def _comfy_cli(args: list[str], cwd: Path, home: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / ".config"),
           "XDG_CACHE_HOME": str(home / ".cache"), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1", "NO_COLOR": "1"}
    return subprocess.run([sys.executable, "-m", "comfy_cli", "--skip-prompt", "--no-json", *args], cwd=cwd, env=env,
                          check=False, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def comfy_cli_clone(tmp_path_factory) -> Path:
    import importlib.util

    if importlib.util.find_spec("comfy_cli") is None:
        pytest.skip("comfy-cli not installed (pip install comfy-cli, in the test extra): no `comfy node` checks")
    if shutil.which("git") is None:
        pytest.skip("git not installed: the registry archive is made from git-tracked files")
    return _clean_clone(tmp_path_factory.mktemp("registry") / "sonic-portrait")


def test_comfy_node_validate_passes(comfy_cli_clone, tmp_path):
    """`comfy node validate` (the checks `comfy node publish` runs, offline): pyproject parses with no warning, and
    ruff's eval/exec/one-line-statements rules find nothing."""
    result = _comfy_cli(["node", "validate"], comfy_cli_clone, tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "All validation checks passed" in output
    assert "Warning" not in output and "Security warnings" not in output, output


def test_comfy_cli_reads_the_registry_fields(comfy_cli_clone, tmp_path):
    code = ("import json; from comfy_cli.registry.config_parser import extract_node_configuration as extract\n"
            "c = extract('pyproject.toml'); p, t = c.project, c.tool_comfy\n"
            "print(json.dumps({'project': {'name': p.name, 'version': p.version, 'license': vars(p.license),"
            " 'supported_comfyui_version': p.supported_comfyui_version, 'urls': vars(p.urls)},"
            " 'tool_comfy': {'publisher_id': t.publisher_id, 'display_name': t.display_name, 'icon': t.icon,"
            " 'includes': list(t.includes)}}, default=str))")
    env = {**os.environ, "HOME": str(tmp_path), "DO_NOT_TRACK": "1", "COMFY_NO_TELEMETRY": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=comfy_cli_clone, env=env, capture_output=True, text=True,
                         check=True).stdout
    import json

    config = json.loads(out.strip().splitlines()[-1])
    project, comfy = config["project"], config["tool_comfy"]
    assert (project["name"], project["version"], project["license"]) == ("sonic-portrait", "0.1.0",
                                                                        {"file": "", "text": "MIT"})
    assert project["supported_comfyui_version"] == ">=0.8.0"
    assert project["urls"]["repository"] == pyproject()["project"]["urls"]["Repository"]
    assert comfy["publisher_id"] == "sonic-portrait" and comfy["display_name"] == "Sonic Portrait"
    assert comfy["icon"].endswith("/icon.svg") and comfy["includes"] == []


def test_comfy_node_pack_archive_holds_the_pack(comfy_cli_clone, tmp_path):
    """`comfy node pack` builds the archive `comfy node publish` uploads: every file the pack uses at run time is in
    it, and what .comfyignore leaves out is not."""
    result = _comfy_cli(["node", "pack"], comfy_cli_clone, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    with zipfile.ZipFile(comfy_cli_clone / "node.zip") as archive:
        names = set(archive.namelist())
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=comfy_cli_clone, capture_output=True, text=True,
                             check=True).stdout.strip("\0").split("\0")
    needed = {name for name in tracked if name.startswith(("nodes/", "sonic/", "web/", "workflows/"))}
    needed |= {"__init__.py", "requirements.txt", "pyproject.toml", "LICENSE", "README.md", "icon.svg"}
    assert needed - names == set()
    assert {name for name in names if name.startswith(("tests/", "benchmarks/", ".ci/"))} == set()
    assert ".git/HEAD" not in names
