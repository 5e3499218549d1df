"""The package's layout: layers that import only downwards, short modules, sub-packages that
say what they own; and a tagger logged by the flat layout that came before still scores."""
from __future__ import annotations

import ast
import base64
import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch

import fat_mlflow
from fat_mlflow.engine.models import build_model, save_checkpoint
from fat_mlflow.serving.tagger import SPEC_ARTIFACT, EnsembleSpec, pyfunc_arguments

PACKAGE = Path(fat_mlflow.__file__).resolve().parent
# lowest first: a module imports only from its own layer or one below it
LAYERS = ("utilities", "data", "engine", "warmup", "serving", "experiments", "benchmarks", "cli")
UTILITIES = {"__init__", "config", "plots", "locking", "processes", "memory"}
FORBIDDEN = {"data": {"mlflow", "torch"}, "engine": {"mlflow", "click"}}
MAX_LINES = 450
OLD_MODEL = Path(__file__).resolve().parent / "fixtures" / "model_logged_by_layout_v1"
OLD_WIDTH = 0.125  # of its fold models


def module_name(path: Path, root: Path) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer_of(module: str) -> str:
    """The layer a module belongs to: its sub-package, or "utilities" for the top-level ones."""
    part = module.split(".")[1] if "." in module else "__init__"
    return "utilities" if part in UTILITIES else part


def imported_names(tree: ast.Module) -> set[str]:
    """Every dotted name an import statement anywhere in the module may refer to, function-level
    imports included: `from a.b import c` gives a.b and a.b.c (c may be a submodule)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
    return names


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a path that ends where it starts, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str] | None:
        state[module] = "open"
        path.append(module)
        for target in sorted(edges.get(module, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target)):
                return cycle
        state[module] = "done"
        path.pop()
        return None

    for module in sorted(edges):
        if module not in state and (cycle := visit(module)):
            return cycle
    return None


def layout_problems(root: Path) -> list[str]:
    """Everything in the package at `root` that breaks the layout, one line each."""
    files = {module_name(path, root): path for path in sorted(root.rglob("*.py"))}
    problems: list[str] = []
    edges: dict[str, set[str]] = {}
    for module, path in files.items():
        text = path.read_text()
        tree = ast.parse(text)
        layer = layer_of(module)
        if layer not in LAYERS:
            problems.append(f"{module}: in no layer; place it in one of {', '.join(LAYERS)}")
            continue
        if path.name == "__init__.py" and not ast.get_docstring(tree):
            problems.append(f"{module}: a package without a docstring saying what it owns")
        if len(text.splitlines()) > MAX_LINES:
            problems.append(f"{module}: {len(text.splitlines())} lines, over {MAX_LINES}")
        if any(isinstance(node, ast.ImportFrom) and node.level for node in ast.walk(tree)):
            problems.append(f"{module}: a relative import; modules import each other by full name")
        names = imported_names(tree)
        for banned in sorted(FORBIDDEN.get(layer, set())):
            if any(name == banned or name.startswith(banned + ".") for name in names):
                problems.append(f"{module}: imports {banned}, which the {layer} layer must not")
        edges[module] = {name for name in names if name in files and name != module}
        for target in sorted(edges[module]):
            target_layer = layer_of(target)
            if target_layer in LAYERS and LAYERS.index(target_layer) > LAYERS.index(layer):
                problems.append(f"{module} ({layer}) imports {target} ({target_layer}), "
                                "a higher layer")
    cycle = find_cycle(edges)
    if cycle:
        problems.append("import cycle: " + " -> ".join(cycle))
    return problems


def test_the_package_keeps_its_layout():
    assert layout_problems(PACKAGE) == []


def test_the_layout_check_finds_each_kind_of_problem(tmp_path):
    files = {
        "__init__.py": '"""A package."""\n',
        "config.py": "from fat_mlflow.engine import training\n",
        "extras.py": "",
        "data/__init__.py": '"""Data."""\n',
        "data/audio.py": "def decode():\n    import torch\n",
        "engine/__init__.py": "",
        "engine/training.py": "import mlflow.pyfunc\nfrom fat_mlflow.engine.crossval import run\n",
        "engine/crossval.py": "from fat_mlflow.engine import training\n" + "x = 1\n" * MAX_LINES,
        "engine/folds.py": "from . import crossval\n",
    }
    for name, text in files.items():
        (tmp_path / "fat_mlflow" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "fat_mlflow" / name).write_text(text)
    problems = "\n".join(layout_problems(tmp_path / "fat_mlflow"))
    for expected in ["fat_mlflow.config (utilities) imports fat_mlflow.engine.training (engine)",
                     "fat_mlflow.extras: in no layer",
                     "fat_mlflow.data.audio: imports torch",
                     "fat_mlflow.engine: a package without a docstring",
                     "fat_mlflow.engine.training: imports mlflow",
                     f"fat_mlflow.engine.crossval: {MAX_LINES + 1} lines",
                     "fat_mlflow.engine.folds: a relative import",
                     "import cycle: fat_mlflow.engine.training -> fat_mlflow.engine.crossval -> "
                     "fat_mlflow.engine.training"]:
        assert expected in problems, problems


# Run as `mlflow models serve` runs a model: a new process, where MLflow puts the model's own
# code/ first on sys.path before anything imports fat_mlflow. A process that has already
# imported the installed package keeps it, and the old model's `fat_mlflow.tagger` is then
# not found there.
SCORE_IN_A_FRESH_PROCESS = textwrap.dedent("""
    import json, sys
    import mlflow, pandas as pd
    model = mlflow.pyfunc.load_model(sys.argv[1])
    scored = model.predict(pd.DataFrame({"audio_base64": [sys.argv[2]]}))
    import fat_mlflow
    print(json.dumps({"scores": scored.drop(columns=["error", "top_labels"]).iloc[0].to_dict(),
                      "error": scored["error"].iloc[0], "package": fat_mlflow.__file__}))
""")


def write_old_checkpoints(folder: Path) -> None:
    """The fixture's two fold models, written as the flat layout's script wrote them: freshly
    initialised width-0.125 CNNs over its five classes, seeds 0 and 1 (weights are not kept in
    git; the checkpoint format is the same in both layouts)."""
    n_classes = len(json.loads((folder / "ensemble.json").read_text())["vocabulary"])
    for index in range(2):
        torch.manual_seed(index)
        save_checkpoint(build_model("cnn", n_classes, OLD_WIDTH), folder / f"cnn_{index}.pt",
                        arch="cnn", width=OLD_WIDTH, n_classes=n_classes)


@pytest.mark.slow
def test_a_model_logged_by_the_flat_layout_scores_as_the_new_code_does(esc50_dir, tmp_path,
                                                                       monkeypatch):
    old_model = shutil.copytree(OLD_MODEL, tmp_path / "old_model")  # its imports write bytecode
    write_old_checkpoints(old_model / "artifacts")
    clip = esc50_dir / "audio" / pd.read_csv(esc50_dir / "meta" / "esc50.csv")["filename"].iloc[0]
    request = base64.b64encode(clip.read_bytes()).decode("ascii")
    monkeypatch.setenv("FAT_MLFLOW_AMP", "false")  # float32 on both sides, whatever the CPU
    done = subprocess.run([sys.executable, "-c", SCORE_IN_A_FRESH_PROCESS, str(old_model), request],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    old = json.loads(done.stdout.strip().splitlines()[-1])
    assert old["error"] == ""
    assert Path(old["package"]).is_relative_to(old_model / "code")  # the old layout's own copy

    artifacts = mlflow.models.Model.load(old_model).flavors["python_function"]["artifacts"]
    files = {key: str(old_model / entry["path"]) for key, entry in artifacts.items()}
    spec = EnsembleSpec.from_json(Path(files.pop(SPEC_ARTIFACT)).read_text())
    mlflow.pyfunc.save_model(tmp_path / "new_model",
                             **pyfunc_arguments(spec, tmp_path / "ensemble.json", files))
    new = mlflow.pyfunc.load_model(str(tmp_path / "new_model")).predict(
        pd.DataFrame({"audio_base64": [request]}))
    assert list(old["scores"]) == list(spec.vocabulary)
    np.testing.assert_allclose(list(old["scores"].values()),
                               new[list(spec.vocabulary)].iloc[0].to_numpy(), rtol=1e-5,
                               atol=1e-6)
