"""Every param is read, and each dvc.yaml stage declares exactly the params keys its command reads.

How: a static read analysis (``ast``, no training). Each stage starts at the function its command
runs (``flows/cli.py``'s ``cmd_*`` or the component function it calls), with its arguments bound to
params sections (``cfg`` = ``detect``, ...). The analysis collects the attribute chains read on
them (``acfg.train.epochs`` with ``acfg = cfg.arch(arch)`` is ``detect.<arch>.train.epochs``),
follows calls into functions of ``components/`` and ``flows/`` with the section bound to the
callee's parameter, and counts as a read of the whole (sub-)section: ``model_dump`` (minus a
constant ``exclude``), passing it to anything it cannot follow (a class, a builtin, ``getattr``
with a computed name) and returning it. Control flow is ignored, so the analysis over-approximates
(every branch reads); what a stage's command never reaches at run time is listed in
``NOT_READ_AT_RUN_TIME`` with the reason. Both sides are compared leaf by leaf, so a declared
section must be read in full, and a declared key covers its sub-keys.

Checked: the leaves dvc.yaml declares for a stage == the leaves the analysis finds (less the
listed exceptions); every leaf of the schema (``Params()``, so a key added to the schema counts)
is read by some stage or by the ``visionflow run`` flow (``orchestration``).
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import yaml

from components.config import DETECTOR_ARCHS, SEGMENTER_ARCHS, load_params

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("components", "flows")

# ``tracking`` says where a run is logged (and is often left to $MLFLOW_TRACKING_URI), not what a
# stage computes: moving the tracking server must not retrain the pipeline. Only register reads it
# as an input (the registry it compares against), and declares it.
LOGGING_ONLY = ("tracking",)

# what the analysis counts as read but the stage's command never reaches at run time
NOT_READ_AT_RUN_TIME: dict[str, dict[str, str]] = {
    "ingest_source": {
        "data.format": "--source FORMAT:PATH replaces data.source",
        "data.path": "--source FORMAT:PATH replaces data.source",
        "data.out": "--out replaces data.out",
        "data.classes": "cmd_ingest sets it to None for another source",
        "data.shapes": "the shapes generator runs only for data's own shapes source (and its record is popped)",
    },
}

# keys no dvc.yaml stage reads, read by the `visionflow run` flow that drives the stages
READ_BY_THE_FLOW = {"orchestration": "flows/retrain.py (run_pipeline, task runner, retries)"}

MODEL_DUMP = ("model_dump", "model_dump_json")
SAME_RECORD = ("model_copy",)  # a copy of the record: still the same params
PARAMS_LOADERS = ("_params", "load_params")  # flows/cli.py's loader and components.config's


# --------------------------------------------------------------------------- the read analysis


@dataclass(frozen=True)
class Read:
    path: tuple[str, ...]
    exclude: frozenset[str] = frozenset()
    include: frozenset[str] | None = None  # model_dump(include=...): only these keys of the section


@cache
def _module(
    name: str,
) -> tuple[ast.Module, dict[str, ast.FunctionDef], dict[str, tuple[str, str | None]]] | None:
    """AST, functions by name (any depth) and imports (``name -> (module, attr)``) of a repo module."""
    if not name.startswith(PACKAGES):
        return None
    base = REPO / Path(*name.split("."))
    path = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
    if not path.exists():
        return None
    tree = ast.parse(path.read_text())
    funcs: dict[str, ast.FunctionDef] = {}
    imports: dict[str, tuple[str, str | None]] = {}
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            funcs.setdefault(node.name, node)  # type: ignore[arg-type]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                is_module = (REPO / Path(*sub.split("."))).with_suffix(".py").exists()
                imports[alias.asname or alias.name] = (sub, None) if is_module else (node.module, alias.name)
    return tree, funcs, imports


def _constant_keys(module: str, expr: ast.AST) -> frozenset[str] | None:
    """The keys of a literal set/list/tuple of strings, or of a module-level constant holding one."""
    if isinstance(expr, ast.Name):
        tree = _module(module)[0]  # type: ignore[index]
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                isinstance(t, ast.Name) and t.id == expr.id for t in node.targets
            ):
                expr = node.value
    if isinstance(expr, (ast.Set, ast.List, ast.Tuple)):
        return frozenset(e.value for e in expr.elts if isinstance(e, ast.Constant))
    return None


@dataclass
class Analysis:
    reads: set[Read] = field(default_factory=set)
    seen: set[tuple[str, str, frozenset[tuple[str, tuple[str, ...]]]]] = field(default_factory=set)

    def run(self, module: str, func: str, env: dict[str, tuple[str, ...]]) -> None:
        key = (module, func, frozenset(env.items()))
        if key in self.seen:
            return
        self.seen.add(key)
        mod = _module(module)
        assert mod is not None and func in mod[1], f"{module}.{func} not found"
        self._function(module, mod[1][func], dict(env))

    # a callee in the repo: (module, function) or None (class, builtin, method, third party)
    def _callee(self, module: str, call: ast.Call) -> tuple[str, ast.FunctionDef] | None:
        _, funcs, imports = _module(module)  # type: ignore[misc]
        f = call.func
        target: tuple[str, str] | None = None
        if isinstance(f, ast.Name):
            if f.id in imports and imports[f.id][1] is not None:
                target = (imports[f.id][0], imports[f.id][1])  # type: ignore[assignment]
            elif f.id in funcs:
                target = (module, f.id)
        elif isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) and f.value.id in imports:
            mod, attr = imports[f.value.id]
            if attr is None:
                target = (mod, f.attr)
        if target is None:
            return None
        other = _module(target[0])
        if other is None or target[1] not in other[1]:
            return None
        return target[0], other[1][target[1]]

    def _function(self, module: str, fn: ast.FunctionDef, env: dict[str, tuple[str, ...]]) -> None:
        parents = {child: node for node in ast.walk(fn) for child in ast.iter_child_nodes(node)}

        def resolve(expr: ast.AST) -> tuple[str, ...] | None:
            if isinstance(expr, ast.Name):
                return env.get(expr.id)
            if isinstance(expr, ast.Attribute):
                base = resolve(expr.value)
                return None if base is None else (*base, expr.attr)
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Attribute):
                base = resolve(expr.func.value)
                if base is not None and expr.func.attr == "arch":
                    return (*base, "{item}")
                if base is not None and expr.func.attr in SAME_RECORD:
                    return base
            if (
                isinstance(expr, ast.Call)
                and isinstance(expr.func, ast.Name)
                and expr.func.id in PARAMS_LOADERS
            ):
                return ()  # the whole Params
            if isinstance(expr, ast.Call) and isinstance(expr.func, ast.Name) and expr.func.id == "getattr":
                base = resolve(expr.args[0])
                if base is not None:
                    name = expr.args[1]
                    return (*base, name.value if isinstance(name, ast.Constant) else "*")
            if isinstance(expr, ast.IfExp):
                return resolve(expr.body) or resolve(expr.orelse)
            if isinstance(expr, ast.BoolOp):
                found = [p for p in map(resolve, expr.values) if p is not None]
                return found[0] if len(found) == 1 else None
            return None

        for _ in range(
            5
        ):  # aliases (``acfg = cfg.arch(arch)``, ``ft, gate = params.finetune, ...``) to a fixpoint
            for node in ast.walk(fn):
                if isinstance(node, ast.Assign) and len(node.targets) == 1:
                    pairs: list[tuple[ast.AST, ast.AST]] = [(node.targets[0], node.value)]
                    if isinstance(node.targets[0], ast.Tuple) and isinstance(node.value, ast.Tuple):
                        pairs = list(zip(node.targets[0].elts, node.value.elts, strict=True))
                    for target, value in pairs:
                        if isinstance(target, ast.Name) and (path := resolve(value)) is not None:
                            env[target.id] = path
        if not env:
            return

        consumed: set[ast.AST] = set()  # arguments bound to a followed callee's parameter
        for node in ast.walk(fn):
            if not isinstance(node, ast.Call):
                continue
            callee = self._callee(module, node)
            if callee is None:
                continue
            cmod, cfn = callee
            params = [a.arg for a in (*cfn.args.posonlyargs, *cfn.args.args)]
            bound: list[tuple[str, ast.AST]] = list(zip(params, node.args, strict=False))
            bound += [(k.arg, k.value) for k in node.keywords if k.arg is not None]
            cenv = {}
            for name, arg in bound:
                if (path := resolve(arg)) is not None:
                    cenv[name] = path
                    consumed.add(arg)
            self.run(cmod, cfn.name, cenv)

        for node in ast.walk(fn):
            if node in consumed or not isinstance(node, (ast.Name, ast.Attribute, ast.Call)):
                continue
            if isinstance(node, ast.Name) and not isinstance(node.ctx, ast.Load):
                continue
            path = resolve(node)
            if path is None:
                continue
            parent = parents.get(node)
            if isinstance(parent, ast.Attribute):  # part of a longer chain or a method's receiver
                call = parents.get(parent)
                if isinstance(call, ast.Call) and call.func is parent and resolve(call) is None:
                    keys = (
                        {k.arg: _constant_keys(module, k.value) for k in call.keywords}
                        if parent.attr in MODEL_DUMP
                        else {}
                    )
                    # model_dump (less a constant exclude, or only a constant include), or a method of a value (list.index)
                    self.reads.add(Read(path, keys.get("exclude") or frozenset(), keys.get("include")))
                continue
            if isinstance(parent, ast.Call) and parent.func is node:
                continue  # cfg.arch(...), getattr(...): resolved as a whole
            if (
                isinstance(parent, ast.Assign)
                and parent.value is node
                or isinstance(parent, ast.Tuple)
                and isinstance(parents.get(parent), ast.Assign)
            ):
                continue  # an alias, read where it is used
            self.reads.add(Read(path))


# --------------------------------------------------------------------------- stages -> entry points


def _params_tree() -> dict[str, Any]:
    tree = load_params(REPO / "params.yaml").model_dump(mode="json")
    for section in ("detect", "segment"):
        del tree[section]["dataset"]  # not a params.yaml key: Params sets it from data.out
    return tree


def _leaves(tree: Any, prefix: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    if isinstance(tree, dict) and tree:
        return set().union(*(_leaves(v, (*prefix, k)) for k, v in tree.items()))
    return {prefix}


def _subtree(tree: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = tree
    for key in path:
        assert isinstance(node, dict) and key in node, f"{'.'.join(path)} is not a params key"
        node = node[key]
    return node


def _has(tree: dict[str, Any], path: tuple[str, ...]) -> bool:
    node: Any = tree
    for key in path:
        if not isinstance(node, dict) or key not in node:
            return False
        node = node[key]
    return True


def _expand(
    tree: dict[str, Any], read: Read, item: str | None, all_items: tuple[str, ...]
) -> set[tuple[str, ...]]:
    """The params leaves a read covers (``{item}`` = the stage's item, or every one when the stage has none)."""
    path = read.path
    if "*" in path:  # getattr with a computed name: the whole section it reads from
        path = path[: path.index("*")]
    if "{item}" in path:
        i = path.index("{item}")
        items = (item,) if item is not None else all_items
        found: set[tuple[str, ...]] = set()
        for x in items:
            if _has(tree, (*path[:i], x, *path[i + 1 :])):
                found |= _expand(
                    tree, Read((*path[:i], x, *path[i + 1 :]), read.exclude, read.include), item, all_items
                )
        # a key of another architecture's section (``acfg.depth`` in UNet's branch) is not this one's read
        assert any(_has(tree, (*path[:i], x, *path[i + 1 :])) for x in all_items), (
            f"{'.'.join(path)} is not a params key"
        )
        return found
    if path[:1] in (("detect",), ("segment",)) and path[1:2] == ("dataset",):
        path = ("data", "out")  # Params._one_dataset
    if path == ("data", "source"):  # DataConfig.source
        return {("data", "format"), ("data", "path")}
    node = _subtree(tree, path)
    if isinstance(node, dict):
        keys = [k for k in node if k not in read.exclude and (read.include is None or k in read.include)]
        return {(*path, *leaf) for k in keys for leaf in _leaves(node[k], (k,))}
    return {path}


def _stage_entries(stage: str) -> list[tuple[str, str, dict[str, tuple[str, ...]]]]:
    """(module, function, {argument: params section}) run by a stage's command, as flows/cli.py calls them."""
    root: dict[str, tuple[str, ...]] = {"params": ()}  # params = _params(args): the whole Params
    det, seg = "components.stages.detect", "components.stages.segment"
    sections = {k: (k,) for k in ("augment", "evaluate", "tracking")}
    return {
        "ingest": [("flows.cli", "cmd_ingest", root)],
        "ingest_source": [("flows.cli", "cmd_ingest", root)],
        "augment": [("flows.cli", "cmd_augment", root)],
        "pretrain": [("flows.cli", "cmd_pretrain", root)],
        "finetune": [("flows.cli", "cmd_finetune", root)],
        # cmd_detect/cmd_segment branch on --compare/--lineage/--arch: each stage starts at its branch's call
        "detect": [(det, "run_detect", {"cfg": ("detect",), **sections})],
        "detect_compare": [(det, "compare_detectors", {"cfg": ("detect",)})],
        "rcnn_lineage": [("components.stages.lineage", "run_lineage", {"cfg": ("detect",)})],
        "segment": [(seg, "run_segment", {"cfg": ("segment",), **sections})],
        "segment_compare": [(seg, "compare_segmenters", {"cfg": ("segment",)})],
        "register": [("flows.cli", "cmd_register", root)],
    }[stage]


def _stages() -> list[tuple[str, str, str | None, list[str], list[str]]]:
    """(stage, dvc stage name, item, declared params, params the cmd line interpolates) of every resolved stage."""
    spec = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    out = []
    for name, stage in spec.items():
        if "foreach" not in stage:
            out.append(
                (name, name, None, list(stage.get("params", [])), re.findall(r"\$\{([^}]+)\}", stage["cmd"]))
            )
            continue
        over = stage["foreach"].strip("${}")
        source = _subtree(params, tuple(over.split(".")))
        for key in source:  # a list (item: e.g. an architecture's name) or a mapping (key -> item)
            declared = [
                p.replace("${item}", key).replace("${key}", key) for p in stage["do"].get("params", [])
            ]
            used = [
                f"{over}.{key}.{ref[len('item.') :]}" if ref.startswith("item.") else ref
                for ref in re.findall(r"\$\{([^}]+)\}", stage["do"]["cmd"])
                if ref not in ("item", "key")  # a list's element names the stage; the list itself is not read
            ]
            out.append((name, f"{name}@{key}", key, declared, used))
    return out


STAGES = _stages()


def _read_leaves(
    stage: str, item: str | None, tree: dict[str, Any], cmd_refs: list[str]
) -> set[tuple[str, ...]]:
    analysis = Analysis(reads={Read(tuple(ref.split("."))) for ref in cmd_refs})
    for module, func, env in _stage_entries(stage):
        analysis.run(module, func, env)
    all_items = tuple(DETECTOR_ARCHS) + tuple(SEGMENTER_ARCHS)
    leaves: set[tuple[str, ...]] = set()
    for read in analysis.reads:
        if read.path[:1] == ("detect",):
            items = tuple(DETECTOR_ARCHS)
        elif read.path[:1] == ("segment",):
            items = tuple(SEGMENTER_ARCHS)
        else:
            items = all_items
        leaves |= _expand(tree, read, item if stage in ("detect", "segment") else None, items)
    if stage != "register":
        leaves = {leaf for leaf in leaves if leaf[0] not in LOGGING_ONLY}
    skip = NOT_READ_AT_RUN_TIME.get(stage, {})
    return {leaf for leaf in leaves if not any(".".join(leaf[: i + 1]) in skip for i in range(len(leaf)))}


def _dotted(leaves: set[tuple[str, ...]]) -> list[str]:
    return sorted(".".join(leaf) for leaf in leaves)


@pytest.mark.parametrize(
    ("stage", "name", "item", "declared", "cmd_refs"), STAGES, ids=[s[1] for s in STAGES]
)
def test_stage_declares_exactly_the_params_it_reads(stage, name, item, declared, cmd_refs):
    tree = _params_tree()
    declared_leaves = set().union(*(_expand(tree, Read(tuple(p.split("."))), item, ()) for p in declared))
    read = _read_leaves(stage, item, tree, cmd_refs)
    assert not read - declared_leaves, (
        f"{name} reads params dvc.yaml does not declare: {_dotted(read - declared_leaves)}"
    )
    assert not declared_leaves - read, (
        f"{name} declares params it never reads: {_dotted(declared_leaves - read)}"
    )


def test_every_param_is_read():
    schema = load_params(REPO / "params.yaml").model_dump(mode="json")
    for section in ("detect", "segment"):
        del schema[section]["dataset"]
    read: set[tuple[str, ...]] = set()
    for stage, _, item, _, cmd_refs in STAGES:
        read |= _read_leaves(stage, item, schema, cmd_refs)
    read |= {leaf for leaf in _leaves(schema) if leaf[0] in READ_BY_THE_FLOW}
    dead = _leaves(schema) - read
    assert not dead, (
        f"params no stage reads (remove them from components/config.py and params.yaml): {_dotted(dead)}"
    )


def test_the_flow_reads_its_section():
    """orchestration's keys are read by ``visionflow run``: each appears as an attribute in flows/retrain.py."""
    names = {
        n.attr
        for n in ast.walk(ast.parse((REPO / "flows/retrain.py").read_text()))
        if isinstance(n, ast.Attribute)
    }
    schema = load_params(REPO / "params.yaml").model_dump(mode="json")
    for section in READ_BY_THE_FLOW:
        for key in schema[section]:
            assert key in names or key == "datasets", f"{section}.{key} is not read by flows/retrain.py"
