"""``scripts/bench_index.py`` runs and reports every figure; with every image a candidate, the two stages recover the
exhaustive top 10 exactly (no timing assertions)."""
import importlib.util
import json
import math

import pytest
from conftest import REPO


def test_bench_index_reports_every_figure(checkpoint, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location('bench_index', REPO / 'scripts' / 'bench_index.py')
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    output = tmp_path / 'bench.json'
    small = ['--checkpoint', str(checkpoint), '--train-images', '16', '--retrieval-images', '8', '--gallery-images',
             '32', '--candidates', '10', '40', '--prototypes', '1', '3', '--images', '3000', '--stored-images', '256',
             '--exhaustive-images', '128', '--speed-candidates', '50', '--queries', '2', '--exhaustive-queries', '1',
             '--repeats', '1']
    bench.main([*small, '--json', str(output)])
    figures = json.loads(output.read_text())
    recall = figures['recall']
    assert recall['gallery_images'] == 40 and recall['queries'] == 24 and recall['prototype_texts'] == 64
    assert set(recall['by_prototypes']) == {'1', '3'} and set(recall['by_prototypes']['3']) == {'1', '2'}
    for by_probes in recall['by_prototypes'].values():
        for by_candidates in by_probes.values():
            assert by_candidates['40']['recall_at_10'] == 1.0  # every image a candidate: the exhaustive top 10
            assert 0 <= by_candidates['10']['recall_at_10'] <= 1
    speed = figures['speed']
    assert (speed['images'], speed['stored_images'], speed['exhaustive_images_measured']) == (3000, 256, 128)
    assert speed['bytes_per_image_features'] == pytest.approx(65536, rel=1e-3)  # B/16, fp16: 2·K·D·2 bytes
    assert speed['bytes_per_image_per_prototype'] == pytest.approx(2048 + 8, rel=1e-2)  # D float32 and an id
    assert speed['bytes_total_at_images']['3'] == pytest.approx(3000 * (65536 + 3 * 2056), rel=1e-2)
    for name in ('two_stage_warm_single_s', 'two_stage_cold_batch_per_query_s', 'exhaustive_s_per_query_extrapolated',
                 'speedup_cold_single'):
        assert math.isfinite(speed[name]) and speed[name] > 0, name
    assert 'extrapolated' in capsys.readouterr().out
    # An existing --json is kept unless --overwrite is given.
    output.write_text('kept')
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*small, '--json', str(output)])
    assert exit_info.value.code == 2
    assert output.read_text() == 'kept'
