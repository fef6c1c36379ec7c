"""``scripts/bench_eval_memory.py`` runs the eval command and splits its peak into the score matrix, the features and
the rest (no memory assertions beyond the arithmetic of that split)."""
import importlib.util
import json

from conftest import REPO


def test_bench_eval_memory_splits_the_peak_into_scores_features_and_the_rest(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('bench_eval_memory', REPO / 'scripts' / 'bench_eval_memory.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / 'memory.json'
    bench.main(['--work', str(tmp_path / 'work'), '--sizes', '6x12', '--batch-size', '4', '--json', str(output)])
    run, = json.loads(output.read_text())['runs']
    assert (run['images'], run['captions']) == (6, 12)
    assert run['score_matrix_mb'] * 2 ** 20 == 4 * 6 * 12
    # Llip-Tiny (K 8, D 64) in float32: an image's keys and values 2·K·D·4 bytes, a caption's query and target 2·D·4
    assert run['features_mb'] * 2 ** 20 == 6 * 2 * 8 * 64 * 4 + 12 * 2 * 64 * 4
    assert run['peak_rss_mb'] > 0
    assert run['rest_mb'] == run['peak_rss_mb'] - run['score_matrix_mb'] - run['features_mb']
    assert '6 images × 12 captions: peak resident' in capsys.readouterr().out
