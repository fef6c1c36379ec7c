"""Every command-line script in scripts/ answers --help: exit 0 and a usage line (argparse %-formats help strings,
so a stray % there crashes --help, not the run)."""
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Scripts with an argparse command line (hatch_build.py is a build hook, not a command).
SCRIPTS = sorted(path for path in (REPO / 'scripts').glob('*.py') if 'argparse' in path.read_text())


def test_the_command_line_scripts_are_found():
    assert {path.name for path in SCRIPTS} >= {'bench_eval.py', 'bench_index.py', 'bench_loss.py',
                                                'compare_clip_benchmark.py', 'demo.py', 'device_check.py',
                                                'kernel_report.py'}


@pytest.mark.parametrize('script', SCRIPTS, ids=lambda path: path.name)
def test_help(script):
    result = subprocess.run([sys.executable, str(script), '--help'], capture_output=True, text=True, cwd=REPO,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert 'usage' in result.stdout
