"""The DVC contract of dvc.yaml: each stage lists exactly the params keys its code reads, and its code deps
cover exactly the library modules it runs.

The params side runs every stage's library entry point on the tiny config with a read-recording view of
the params (:mod:`params_recorder`); the training stages (and evaluate/export of a model with adapters) run
once more for every other ``train.method``, since what a phase reads depends on the method (``loss.la_tau``
only for the logit-adjusted ones). A key read but not listed means `dvc repro` would miss a change; a
listed key that no method reads means it re-runs the stage for nothing (the README's `dvc exp run -S
train.phase2.epochs=...` once re-ran phase 1). Keys interpolated into a stage (`${data.out_dir}` in its
cmd/deps/outs) count as listed: DVC sees their change through the changed stage definition.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import REPO_ROOT, make_tiny_params
from lpt.config import read_raw
from params_recorder import ParamsRecorder, leaf_paths

DVC_YAML = REPO_ROOT / "dvc.yaml"
_INTERP = re.compile(r"\$\{([^}]+)\}")

# Modules that are not a stage's computation: the command-line shell and the params schema (its product,
# the params values, is what DVC tracks through `params:`; the `params` stage depends on the schema file).
SHELL_MODULES = {"lpt/__init__.py", "lpt/__main__.py", "lpt/cli.py", "lpt/config.py", "lpt/exitcodes.py"}


def _dvc() -> dict[str, Any]:
    return yaml.safe_load(DVC_YAML.read_text())


def _lookup(raw: dict[str, Any], dotted: str) -> Any:
    node: Any = raw
    for part in dotted.split("."):
        node = node[part]
    return node


def _resolve(text: str, raw: dict[str, Any]) -> str:
    return _INTERP.sub(lambda m: str(_lookup(raw, m.group(1))), text)


def _interpolated(spec: Any) -> set[str]:
    """Keys referenced with ``${...}`` anywhere in a stage definition."""
    return set(_INTERP.findall(yaml.safe_dump(spec)))


def _entries(items: list[Any] | None) -> list[str]:
    return [next(iter(i)) if isinstance(i, dict) else str(i) for i in items or []]


def _under(leaf: str, entry: str) -> bool:
    return leaf == entry or leaf.startswith(entry + ".")


def _in_path(path: str, dep: str) -> bool:
    dep = dep.rstrip("/")
    return path == dep or path.startswith(dep + "/")


def _leaves(entries: set[str], raw: dict[str, Any]) -> set[str]:
    all_leaves = leaf_paths(raw)
    return {leaf for leaf in all_leaves for e in entries if _under(leaf, e)}


def _run_stages(root: Path) -> dict[str, set[str]]:
    """Run every stage's library function on the tiny config, each with its own recorder."""
    import torch

    from lpt.evaluate import run_evaluate
    from lpt.data.ingest import run_ingest
    from lpt.data.validate import run_validation
    from lpt.export import run_export
    from lpt.pack import run_pack
    from lpt.methods import METHODS, get_method
    from lpt.pretrain import pretrain_backbone
    from lpt.train import run_phase

    torch.set_num_threads(1)
    params = make_tiny_params(root, backbone__weights="pretrain")
    calls = {"ingest": run_ingest, "validate": run_validation, "pretrain": pretrain_backbone,
             "phase1": lambda p: run_phase(p, 1), "phase2": lambda p: run_phase(p, 2),
             "evaluate": run_evaluate, "export": run_export, "pack": run_pack}
    reads: dict[str, set[str]] = {}
    for stage, call in calls.items():
        recorder = ParamsRecorder(params)
        call(recorder)
        reads[stage] = set(recorder.reads)
    # every other method through the training stages, on the same shards and backbone, outputs of its own;
    # one with adapters through evaluate and export too (its geometry must come from the checkpoint alone)
    for method in METHODS:
        if method == params.train.method:
            continue
        mp = make_tiny_params(root, backbone__weights="pretrain", train__method=method,
                              train__out_dir=str(root / method / "models"), evaluate__out_dir=str(root / method / "reports"),
                              export__out_dir=str(root / method / "export"))
        stages = ["phase1", "phase2"] + (["evaluate", "export"] if get_method(method).adapter else [])
        for stage in stages:
            recorder = ParamsRecorder(mp)
            calls[stage](recorder)
            reads[stage] |= recorder.reads
    return reads


@pytest.fixture(scope="module")
def stage_reads(tmp_path_factory: pytest.TempPathFactory) -> dict[str, set[str]]:
    return _run_stages(tmp_path_factory.mktemp("contract"))


def test_every_stage_lists_exactly_the_params_it_reads(stage_reads: dict[str, set[str]]) -> None:
    raw = read_raw(REPO_ROOT / "params.yaml")
    stages = _dvc()["stages"]
    assert set(stage_reads) | {"params"} == set(stages), "a stage without a recorded entry point"
    problems = []
    for name, reads in stage_reads.items():
        spec = stages[name]
        assert "*" not in reads, f"{name}: reads the whole params object"
        listed = {_resolve(e, raw) for e in spec.get("params", [])}
        for entry in listed:
            try:
                _lookup(raw, entry)
            except KeyError:
                problems.append(f"{name}: lists {entry!r}, which params.yaml does not have")
        listed_leaves = _leaves(listed, raw)
        covered = listed_leaves | _leaves(_interpolated(spec), raw)
        read_leaves = _leaves(reads, raw) | {r for r in reads if r.endswith("timm_kwargs")}
        for leaf in sorted(read_leaves - covered):
            problems.append(f"{name}: reads {leaf!r} but does not list it")
        for leaf in sorted(listed_leaves - read_leaves):
            if _lookup(raw, leaf) is not None:  # an optional key (null) is read only when another key enables it
                problems.append(f"{name}: lists {leaf!r} but no method reads it")
    assert not problems, "\n".join(problems)


# ------------------------------------------------------------------------------------------ code deps
def _module_file(name: str) -> Path | None:
    base = REPO_ROOT / Path(*name.split("."))
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _imports(path: Path) -> set[str]:
    """Every ``lpt`` module a file imports anywhere (function-level imports too), with parent packages."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names if a.name.split(".")[0] == "lpt"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "lpt":
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    with_parents = set()
    for name in names:
        parts = name.split(".")
        with_parents |= {".".join(parts[:i]) for i in range(2, len(parts) + 1)}
    return {n for n in with_parents if _module_file(n)}


def _closure(module: str) -> set[str]:
    """Repo-relative files of ``module`` and everything it imports from ``lpt``, transitively."""
    seen: set[str] = set()
    todo = [module, *_parents(module)]
    while todo:
        name = todo.pop()
        path = _module_file(name)
        rel = path.relative_to(REPO_ROOT).as_posix() if path else None
        if rel is None or rel in seen or rel in SHELL_MODULES:
            continue
        seen.add(rel)
        todo.extend(_imports(path))
    return seen


def _parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(2, len(parts))]


def _has_code(path: Path) -> bool:
    """False for a module that is only a docstring (an empty or documentation-only package ``__init__``)."""
    body = ast.parse(path.read_text()).body
    return any(not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant)) for n in body)


ENTRY_MODULES = {"params": "lpt.config", "ingest": "lpt.data.ingest", "validate": "lpt.data.validate",
                 "pretrain": "lpt.pretrain", "phase1": "lpt.train.run", "phase2": "lpt.train.run",
                 "evaluate": "lpt.evaluate", "export": "lpt.export", "pack": "lpt.pack"}


@pytest.mark.parametrize("stage", sorted(ENTRY_MODULES))
def test_code_deps_cover_exactly_the_modules_a_stage_runs(stage: str) -> None:
    spec = _dvc()["stages"][stage]
    code_deps = [d for d in _entries(spec.get("deps")) if d.startswith("lpt/")]
    if stage == "params":
        used = {"lpt/config.py"} | {f for f in _closure("lpt.methods")}
    else:
        used = {f for f in _closure(ENTRY_MODULES[stage]) if _has_code(REPO_ROOT / f)}
    uncovered = sorted(f for f in used if not any(_in_path(f, d) for d in code_deps))
    unused = sorted(d for d in code_deps if not any(_in_path(f, d) for f in used))
    assert not uncovered, f"{stage}: runs {uncovered} but dvc.yaml does not list them as deps"
    assert not unused, f"{stage}: lists {unused} as deps but never imports them"


def test_params_check_stamp_does_not_depend_on_the_values(tmp_path: Path) -> None:
    """The `params` stage's output is constant, so a valid edit re-runs only the stages that read the key."""
    from typer.testing import CliRunner

    from lpt.cli import app
    from lpt.config import write_params_atomic

    stamps = []
    for epochs in (1, 7):
        params = make_tiny_params(tmp_path, train__phase2__epochs=epochs)
        write_params_atomic(tmp_path / "params.yaml", params.to_dict())
        stamp = tmp_path / f"ok{epochs}"
        result = CliRunner().invoke(app, ["params", "check", str(tmp_path / "params.yaml"), "--stamp", str(stamp)])
        assert result.exit_code == 0, result.output
        stamps.append(stamp.read_bytes())
    assert stamps[0] == stamps[1]
    (tmp_path / "bad.yaml").write_text("seed: [1\n")
    bad = CliRunner().invoke(app, ["params", "check", str(tmp_path / "bad.yaml"), "--stamp", str(tmp_path / "no")])
    assert bad.exit_code == 2 and not (tmp_path / "no").exists() and "Traceback" not in bad.output
