"""scripts/device_check.py without a GPU: its arguments, and a dry run of its correctness checks at the tiny
shape under Triton's interpreter (in a subprocess: TRITON_INTERPRET=1 must be set before Triton is imported)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip('triton')

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'device_check.py'


def load_script():
    spec = importlib.util.spec_from_file_location('device_check', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_needs_a_gpu_or_the_interpreter(capsys):
    check = load_script()
    with pytest.raises(SystemExit):
        check.parse_args(['--dry-run'])  # this process imported Triton without the interpreter
    if not check.torch.cuda.is_available():
        with pytest.raises(SystemExit):
            check.parse_args([])
    assert 'TRITON_INTERPRET=1' in capsys.readouterr().err


def test_dry_run_checks_loss_and_gradients_under_the_interpreter(tmp_path):
    out = tmp_path / 'device_check.json'
    env = dict(os.environ, TRITON_INTERPRET='1')
    result = subprocess.run([sys.executable, str(SCRIPT), '--dry-run', '--json', str(out)], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    records = json.loads(out.read_text())
    checks = [r for r in records if r['section'] == 'correctness']
    assert {(r['shape'], r['dtype'], r['scheme']) for r in checks} == {
        ('tiny', 'bfloat16', 'two-pass'), ('tiny', 'bfloat16', 'one-pass'), ('tiny', 'bfloat16', 'one launch'),
        ('tiny', 'float32', 'two-pass')}
    for record in checks:
        assert record['ok'], record
        assert set(record['float64']) == {'loss', 'features', 'gram', 'texts', 'logit_scale', 'logit_bias'}
    assert records[-1]['section'] == 'total' and records[-1]['ok']
    assert 'checks ok' in result.stdout
