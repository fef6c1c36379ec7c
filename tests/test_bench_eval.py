"""``scripts/bench_eval.py`` runs and reports every figure (values are not checked: no timing assertions)."""
import importlib.util
import json
import math

import pytest
from conftest import REPO


def test_bench_eval_reports_every_figure(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('bench_eval', REPO / 'scripts' / 'bench_eval.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / 'bench.json'
    bench.main(['--classes', '12', '--templates', '2', '--batch-size', '4', '--repeats', '1', '--json', str(output)])
    figures = json.loads(output.read_text())
    assert (figures['model'], figures['classes'], figures['templates'], figures['batch_size']) == ('Llip-Tiny', 12, 2, 4)
    for name in ('classifier_build_s', 'zero_shot_images_per_s', 'encode_images_per_s', 'scoring_pairs_per_s'):
        assert math.isfinite(figures[name]) and figures[name] > 0, name
    assert 'pairs/s' in capsys.readouterr().out
    # An existing --json is kept unless --overwrite is given.
    output.write_text('kept')
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--classes', '12', '--templates', '2', '--json', str(output)])
    assert exit_info.value.code == 2
    assert output.read_text() == 'kept'

