"""The offline GPU node has no boto3, matplotlib, datasets or wandb (DESIGN.md: the GPU image plus the
wheelhouse). `make device-check` imports the training, data and benchmark code there, and runs the gpu tests:
a module-level import of a package the node lacks fails the whole check, in the one call a session may get.
Such packages are imported inside the function that needs them; this test keeps it so.
"""

import ast
import sys
from pathlib import Path

from conftest import REPO

# The GPU image (Python 3.12, torch, transformers, tokenizers, numpy, triton, pytest, pyyaml and what torch
# and transformers pull in) plus benchmarks/wheelhouse.txt, by import name; and our own packages.
ON_THE_NODE = {
    "torch", "triton", "numpy", "transformers", "tokenizers", "safetensors", "yaml", "filelock", "tqdm",
    "pytest", "composer", "torchmetrics", "streaming", "omegaconf", "optimi", "zstandard",
    "modernbert_train", "data_prep", "benchmarks", "conftest",
}  # fmt: skip


def module_level_imports(path: Path) -> set[str]:
    """Top-level names imported when the module is imported (function bodies are left out)."""
    names = set()
    pending = list(ast.parse(path.read_text(), str(path)).body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            pending.extend(ast.iter_child_nodes(node))
        elif isinstance(node, ast.ExceptHandler):
            pending.extend(node.body)
    return {name for name in names if name not in sys.stdlib_module_names}


def device_check_files() -> list[Path]:
    code = [
        p for folder in ("modernbert_train", "data_prep", "benchmarks") for p in (REPO / folder).rglob("*.py")
    ]
    gpu_tests = [p for p in (REPO / "tests").glob("test_*.py") if "pytest.mark.gpu" in p.read_text()]
    return code + gpu_tests + [REPO / "tests" / "conftest.py"]


def test_code_the_device_check_imports_needs_nothing_the_gpu_node_lacks():
    missing = {
        str(path.relative_to(REPO)): sorted(module_level_imports(path) - ON_THE_NODE)
        for path in device_check_files()
    }
    assert {path: names for path, names in missing.items() if names} == {}
