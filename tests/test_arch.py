"""The adapter registry (``headslim.arch``) and the guards that keep architecture knowledge in it.

* every registered family, on each of its tiny configs and model classes: a random joint plan (heads
  and FFN neurons; a layer with no head, one with no neuron, one with a single head and neuron) is
  exact against the gated dense model and survives save_pruned / load_pruned; repair re-fits every
  pruned projection; the analytic cost model reads the family right; every exportable model type
  exports with parity (and fuses, where its export spec says ORT's optimizer applies). A new family
  file is covered by these tests without editing any of them;
* no ``model_type`` comparison, class-name test or family constant in ``headslim/`` outside ``arch/``;
* no import cycle among headslim's modules at module level.
"""

from __future__ import annotations

import ast
import copy
import importlib
import importlib.util
import pkgutil
import random
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import headslim
from headslim.arch import ADAPTERS, TINY, Adapter, adapters, get_adapter, kv_maps, supported_model_types
from headslim.errors import HeadslimError
from headslim.gates import gated
from headslim.io import save_pruned
from headslim.plan import PrunePlan
from headslim.surgery import prune_heads
from tests.conftest import main_output, tiny_inputs

ARCH_DIR = Path(headslim.__file__).parent / "arch"
SHARED_MODULES = {"__init__", "base", "stubs", "ragged"}

# (adapter name, tiny config, model class) for every family, tiny config and model class
CASES = [(adapter.name, tc, cls) for adapter in adapters() for tc in adapter.tiny_configs() for cls in tc.model_classes]
# encoders; decoders (export_spec().decoder_layout) have their own tests: tests/test_export_decoder.py
EXPORTABLE = [(adapter.name, tc) for adapter in adapters() for tc in adapter.tiny_configs()
              if adapter.export_spec(tc.model_type).exportable and not adapter.export_spec(tc.model_type).decoder_layout]


def _id(case) -> str:
    return case[2] if len(case) == 3 else case[1].model_type


# ---- the registry ---------------------------------------------------------------------------------


def test_every_family_module_registers_an_adapter():
    """Adding a family is adding one file: each module of headslim/arch/ (but the shared ones)
    registers an adapter, found without being imported by hand."""
    modules = {info.name for info in pkgutil.iter_modules([str(ARCH_DIR)])} - SHARED_MODULES
    registered = {type(a).__module__.rsplit(".", 1)[1] for a in adapters()}
    assert modules == registered, modules ^ registered
    assert {"bert", "distilbert", "gpt2", "llama"} <= registered


def test_registry_is_consistent():
    families = list(adapters())
    assert len({a.name for a in families}) == len(families)
    types = [t for a in families for t in a.model_types]
    assert len(types) == len(set(types)) and set(types) == set(ADAPTERS) == set(supported_model_types())
    for adapter in families:
        assert isinstance(adapter, Adapter) and adapter.name
        assert ADAPTERS[adapter.model_types[0]] is adapter
        # coverage guard: every model type the family claims has a tiny config the tests build
        tiny = [tc.model_type for tc in adapter.tiny_configs()]
        assert sorted(tiny) == sorted(adapter.model_types), (adapter.name, tiny)
        for tc in adapter.tiny_configs():
            assert tc.model_classes, tc.model_type
            assert get_adapter(tc.config()) is adapter


def test_unsupported_model_type_is_one_line():
    with pytest.raises(HeadslimError, match=r"^unsupported architecture 'opt'; supported model types: "
                                            + ", ".join(supported_model_types()) + "$"):
        get_adapter(type("Config", (), {"model_type": "opt"})())


def test_import_of_the_registry_is_cheap():
    import subprocess
    import sys

    code = ("import sys; from headslim.arch import supported_model_types; supported_model_types(); "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# ---- every family: exact surgery, save / load, export ---------------------------------------------


def random_joint_plan(model, seed: int) -> PrunePlan:
    """Random kept heads and FFN neurons; one layer keeps no head, one no neuron, one a single head
    and a single neuron (which layer is which is random too)."""
    adapter = get_adapter(model)
    heads, widths = adapter.num_heads(model), adapter.num_neurons(model)
    maps = kv_maps(model)
    gqa = any(len(set(m)) < len(m) for m in maps)
    rng = random.Random(seed)
    kept_h = [sorted(rng.sample(range(n), rng.randint(1, n))) for n in heads]
    kept_n = [sorted(rng.sample(range(w), rng.randint(1, w))) for w in widths]
    no_heads, no_neurons, one_each = rng.sample(range(len(heads)), 3)
    kept_h[no_heads], kept_n[no_neurons] = [], []
    kept_h[one_each], kept_n[one_each] = [rng.randrange(heads[one_each])], [rng.randrange(widths[one_each])]
    return PrunePlan(heads, kept_h, {"method": "random-joint", "seed": seed}, kv_head_of_q=maps if gqa else None,
                     num_neurons=widths, kept_neurons=kept_n)


@pytest.mark.parametrize("family,tiny,class_name", CASES, ids=[_id(c) for c in CASES])
def test_family_pruned_equals_gated_dense_and_reloads(tmp_path, family, tiny, class_name):
    dense = tiny.build(class_name)
    adapter = get_adapter(dense)
    assert adapter.name == family
    assert adapter.num_heads(dense) == [dense.config.num_attention_heads] * TINY.layers
    assert adapter.num_neurons(dense) == [adapter.intermediate_size(dense.config)] * TINY.layers
    plan = random_joint_plan(dense, seed=zlib.crc32(class_name.encode()))
    inputs = tiny_inputs()
    with torch.no_grad(), gated(dense, plan.mask(), neurons=plan.neuron_mask()):
        expected = main_output(dense(**inputs))
    pruned = prune_heads(copy.deepcopy(dense), plan)
    assert adapter.num_heads(pruned) == plan.heads_after
    assert adapter.num_neurons(pruned) == plan.neurons_after
    with torch.no_grad():
        got = main_output(pruned(**inputs))
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-5, (plan.kept_heads, plan.kept_neurons)

    save_pruned(pruned, tmp_path / "slim", plan)
    reloaded = headslim.load_pruned(tmp_path / "slim")
    assert type(reloaded) is type(pruned)
    assert adapter.num_heads(reloaded) == plan.heads_after
    assert adapter.num_neurons(reloaded) == plan.neurons_after
    expected_state, reloaded_state = pruned.state_dict(), reloaded.state_dict()
    assert reloaded_state.keys() == expected_state.keys()
    assert all(torch.equal(reloaded_state[k], v) for k, v in expected_state.items())  # the same weights, bit for bit
    with torch.no_grad():  # the same computation, up to the kernels' summation order (it differs with the
        # buffers' alignment on some CPUs: 9e-10 seen for ELECTRA on an AMD EPYC without AVX-512)
        torch.testing.assert_close(main_output(reloaded(**inputs)), got, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family,tiny", EXPORTABLE, ids=[_id(c) for c in EXPORTABLE])
def test_exportable_family_exports_with_parity(tmp_path, family, tiny):
    """A pruned checkpoint (uneven heads, a layer with none, one with no FFN) exports; model.onnx
    matches PyTorch on inputs of a new shape; with ORT's optimizer every attention fuses."""
    import onnxruntime as ort

    from headslim.export import export_onnx

    class_name = next((c for c in tiny.model_classes if c.endswith("ForSequenceClassification")),
                      tiny.model_classes[0])
    model = tiny.build(class_name)
    spec = get_adapter(model).export_spec(tiny.model_type)
    plan = random_joint_plan(model, seed=1)
    prune_heads(model, plan)
    save_pruned(model, tmp_path / "slim", plan)
    fuse = spec.optimizer_model_type is not None
    report = export_onnx(tmp_path / "slim", tmp_path / "onnx", optimize=fuse, prefer="unfused")
    assert report.inputs == list(spec.inputs)
    assert report.heads_per_layer == plan.heads_after and report.neurons_per_layer == plan.neurons_after
    if fuse:
        assert report.fusion["all_attention_fused"], report.fusion

    gen = torch.Generator().manual_seed(7)
    ids = torch.randint(5, TINY.vocab, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    mask[2, 1:] = 0
    feeds = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in spec.inputs:
        feeds["token_type_ids"] = torch.zeros_like(ids)
    with torch.no_grad():
        expected = main_output(model(**feeds)).numpy()
    for name in report.graphs.values():
        if name == "model_quantized.onnx":
            continue
        sess = ort.InferenceSession(str(tmp_path / "onnx" / name), providers=["CPUExecutionProvider"])
        assert [i.name for i in sess.get_inputs()] == list(spec.inputs)
        (got,) = sess.run(None, {k: v.numpy() for k, v in feeds.items()})
        assert np.abs(got - expected).max() <= 1e-4, name


TINY_CASES = [(adapter.name, tc) for adapter in adapters() for tc in adapter.tiny_configs()]


@pytest.mark.parametrize("family,tiny", TINY_CASES, ids=[_id(c) for c in TINY_CASES])
def test_family_repair_refits_every_pruned_projection(family, tiny):
    """Repair finds every pruned O and down projection through the adapter (``mlp_residual`` says where
    the FFN's residual enters), lowers each one's fitting error and brings the outputs closer to dense."""
    from headslim.repair import repair
    from tests.conftest import tiny_batches

    dense = tiny.build()
    adapter = get_adapter(dense)
    plan = random_joint_plan(dense, seed=2)
    model = prune_heads(copy.deepcopy(dense), plan)
    calib = tiny_batches(8)

    def error(m):
        with torch.no_grad():
            return sum(float((main_output(m(**b)) - main_output(dense(**b))).pow(2)[b["attention_mask"].bool()].sum())
                       for b in calib)

    before = error(model)
    report = repair(model, dense, plan, calib, holdout=0.0, check=False, progress=False)
    floor = 0 if adapter.keeps_bias_projection else 1  # a layer left without a projection has nothing to fit
    expected = {(layer, "attention") for layer, (k, n) in enumerate(zip(plan.kept_heads, plan.num_heads))
                if floor <= len(k) < n}
    expected |= {(layer, "mlp") for layer, (k, n) in enumerate(zip(plan.kept_neurons, plan.num_neurons))
                 if floor <= len(k) < n}
    assert {(e["layer"], e["kind"]) for e in report.layers} == expected
    assert all(e["fit_after"] <= e["fit_before"] + 1e-9 for e in report.layers), report.layers
    assert error(model) < 0.8 * before


@pytest.mark.parametrize("family,tiny", TINY_CASES, ids=[_id(c) for c in TINY_CASES])
def test_family_cost_model_counts_its_layers(family, tiny):
    """headslim.flops reads the family's shape through the adapter (FFN width, gated MLP, KV heads):
    its analytic parameter count is within a few percent of the layers' real one (exact where the
    layers have BERT's biases and LayerNorms)."""
    from headslim.flops import LayerShape, encoder_params

    dense = tiny.build()
    adapter = get_adapter(dense)
    shape = LayerShape.from_model(dense)
    assert shape.intermediate == adapter.num_neurons(dense)[0]
    assert shape.mlp_matrices == (3 if adapter.gated_mlp else 2)
    params = {id(p): p.numel() for block in [*adapter.attention_blocks(dense), *adapter.mlp_blocks(dense)]
              for p in block.parameters()}
    counted = sum(params.values())
    assert abs(encoder_params(shape)["total"] - counted) <= 0.05 * counted, (encoder_params(shape), counted)


# ---- guards: architecture knowledge stays in headslim/arch/ ----------------------------------------


def _family_words() -> tuple[set[str], tuple[str, ...]]:
    """Registered model types and family names; the class-name prefixes of the families (``Bert``)."""
    words = set(supported_model_types()) | {a.name for a in adapters()}
    prefixes = tuple(tc.config_class.removesuffix("Config") for a in adapters() for tc in a.tiny_configs())
    return words, prefixes


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def _is_model_type(node: ast.AST) -> bool:
    return (isinstance(node, ast.Name) and node.id == "model_type") or \
        (isinstance(node, ast.Attribute) and node.attr == "model_type")


def _violations(path: Path, words: set[str], prefixes: tuple[str, ...]) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docs = _docstrings(tree)
    found = []

    def flag(node, what):
        found.append(f"{path}:{node.lineno}: {what}: {ast.unparse(node)[:100]}")

    def family_class(node) -> bool:
        names = node.elts if isinstance(node, ast.Tuple) else [node]
        return any(isinstance(n, (ast.Name, ast.Attribute)) and
                   (n.id if isinstance(n, ast.Name) else n.attr).startswith(prefixes) for n in names)

    for node in ast.walk(tree):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            eq_or_in = any(isinstance(op, (ast.Eq, ast.NotEq, ast.In, ast.NotIn)) for op in node.ops)
            if eq_or_in and any(_is_model_type(s) for s in sides):
                flag(node, "model_type comparison")
            if any(isinstance(s, ast.Constant) and s.value in words for s in sides):
                flag(node, "comparison with a family name")
            if any(isinstance(s, ast.Attribute) and s.attr == "__name__" for s in sides) and \
                    any(isinstance(s, ast.Constant) and isinstance(s.value, str) for s in sides):
                flag(node, "class-name test")
        elif isinstance(node, ast.keyword) and node.arg == "model_type" and isinstance(node.value, ast.Constant):
            flag(node, "family constant")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and \
                node.func.id in ("isinstance", "issubclass") and len(node.args) == 2 and family_class(node.args[1]):
            flag(node, "family class test")
        elif isinstance(node, (ast.Name, ast.Attribute)) and \
                (node.id if isinstance(node, ast.Name) else node.attr) == "Conv1D":
            flag(node, "Conv1D")
        elif isinstance(node, ast.alias) and node.name.rsplit(".", 1)[-1] == "Conv1D":
            found.append(f"{path}: imports Conv1D")  # an alias has no line number before 3.10
        elif isinstance(node, ast.Constant) and id(node) not in docs and node.value == "Conv1D":
            flag(node, "Conv1D")
    return found


def test_no_architecture_tests_outside_arch():
    words, prefixes = _family_words()
    package = ARCH_DIR.parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if ARCH_DIR not in path.parents:
            found += _violations(path, words, prefixes)
    assert not found, "architecture knowledge outside headslim/arch/ (ask the adapter):\n" + "\n".join(found)


def test_the_guard_catches_what_it_forbids(tmp_path):
    words, prefixes = _family_words()
    bad = tmp_path / "bad.py"
    bad.write_text('from transformers.pytorch_utils import Conv1D\n'
                   'def f(config, module, adapter):\n'
                   '    """Mentions Conv1D and model_type == "bert" in a docstring: fine."""\n'
                   '    a = config.model_type in ("roberta", "xlm-roberta")\n'
                   '    b = type(module).__name__ == "Conv1D"\n'
                   '    c = adapter.name == "llama-family"\n'
                   '    d = isinstance(module, BertSelfAttention)\n'
                   '    return optimize(model_type="bert")\n')
    found = "\n".join(_violations(bad, words, prefixes))
    for what in ("imports Conv1D", "model_type comparison", "class-name test", "comparison with a family name",
                 "family class test", "family constant"):
        assert what in found, (what, found)
    assert "docstring" not in found


# ---- guard: no import cycles ----------------------------------------------------------------------


def _headslim_modules() -> dict[str, Path]:
    """Every module of the installed headslim package (its kernels included), name -> file."""
    import headslim.kernels  # installed from the top-level kernels/ folder: not under headslim.__path__

    modules = {"headslim": Path(headslim.__file__)}
    for package in (headslim, headslim.kernels):
        modules[package.__name__] = Path(package.__file__)
        for info in pkgutil.walk_packages(package.__path__, f"{package.__name__}."):
            spec = importlib.util.find_spec(info.name)
            if spec is not None and spec.origin and spec.origin.endswith(".py"):
                modules[info.name] = Path(spec.origin)
    return modules


def _top_level_imports(name: str, path: Path, known: set[str]) -> set[str]:
    """headslim modules ``name`` imports at module level (not inside functions, not TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue
        if isinstance(node, (ast.If, ast.Try, ast.With)):
            stack += [n for n in ast.iter_child_nodes(node) if isinstance(n, ast.stmt)]
            if isinstance(node, ast.Try):
                for handler in node.handlers:
                    stack += handler.body
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m in known and m != name}


def test_every_module_imports_and_no_import_cycles():
    modules = _headslim_modules()
    assert {"headslim.arch.base", "headslim.arch.distilbert", "headslim.kernels.wiring"} <= set(modules)
    for name in modules:
        if name != "headslim.__main__":  # runs the CLI
            importlib.import_module(name)
    graph = {name: _top_level_imports(name, path, set(modules)) for name, path in modules.items()}
    assert graph["headslim.arch.bert"] >= {"headslim.arch.base"}  # the parser sees imports

    cycles, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name)
    assert not cycles, "import cycles at module level:\n" + "\n".join(cycles)
