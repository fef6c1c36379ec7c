"""The package's layers (``[tool.importlinter]`` in pyproject.toml): each imports only those below it."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).parent / 'lint-imports'


def lint_imports(source: Path, cwd: Path) -> subprocess.CompletedProcess:
    """import-linter's contracts of ``cwd``'s pyproject.toml, over the package found under ``source``."""
    environment = dict(os.environ, PYTHONPATH=str(source))
    return subprocess.run([str(LINT_IMPORTS), '--no-cache'], cwd=cwd, env=environment, capture_output=True, text=True)


@pytest.fixture(scope='module')
def package_copy(tmp_path_factory):
    """A copy of the package and its contracts, to break."""
    root = tmp_path_factory.mktemp('layers')
    shutil.copytree(REPO / 'open_clip_llip', root / 'open_clip_llip', ignore=shutil.ignore_patterns('__pycache__'))
    shutil.copy(REPO / 'pyproject.toml', root)
    return root


def test_package_keeps_its_layers():
    result = lint_imports(REPO, REPO)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize('module, upward', [
    ('modeling/llip_model.py', 'from ..evaluation import tasks'),
    ('loss/sigmoid.py', 'from ..integration import plugin'),
    ('modeling/mixer.py', 'import open_clip_train.main'),
])
def test_an_upward_import_breaks_the_contract(package_copy, module, upward):
    path = package_copy / 'open_clip_llip' / module
    original = path.read_text()
    path.write_text(f'{original}\n{upward}  # noqa\n')
    try:
        result = lint_imports(package_copy, package_copy)
    finally:
        path.write_text(original)
    assert result.returncode != 0
    assert 'BROKEN' in result.stdout
