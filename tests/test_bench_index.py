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
             '--repeats', '3', '--batch-repeats', '2', '--bytes-images', '4', '--bytes-prototypes', '4',
             '--encode-images', '1', '--speed-model', 'Llip-Tiny']
    bench.main([*small, '--json', str(output)])
    figures = json.loads(output.read_text())
    recall = figures['recall']
    assert recall['gallery_images'] == 40 and recall['queries'] == 24 and recall['prototype_texts'] == 64
    assert set(recall['by_prototypes']) == {'1', '3'} and set(recall['by_prototypes']['3']) == {'1', '2'}
    for by_probes in recall['by_prototypes'].values():
        for by_candidates in by_probes.values():
            assert by_candidates['40']['recall_at_10'] == 1.0  # every image a candidate: the exhaustive top 10
            assert 0 <= by_candidates['10']['recall_at_10'] <= 1
    assert 0 <= recall['int8']['by_candidates']['40'] <= 1  # every image a candidate, but int8 re-scoring
    speed = figures['speed']
    assert (speed['images'], speed['stored_images'], speed['exhaustive_images_measured']) == (3000, 256, 128)
    per_image = speed['bytes']['per_image']
    assert per_image['image_features.npy'] == 2 * 8 * 64 * 2  # Llip-Tiny, float16: 2·K·D·2 bytes
    assert per_image['first_stage.faiss'] == 4 * (16 + 8)  # P = 4 codes of 16 bytes and ids
    assert per_image['names.json'] == len('"images/000000000.jpg", ')
    assert speed['bytes']['besides_features'] <= 8192
    assert speed['bytes']['encode_s_per_image'] > 0 and math.isfinite(speed['bytes']['index_s_per_image'])
    for name in ('two_stage_warm_single', 'two_stage_cold_batch_per_query', 'first_stage_warm_single'):
        assert 0 < speed[name]['p50_s'] <= speed[name]['p95_s'], name
    for name in ('exhaustive_s_per_query_extrapolated', 'speedup_cold_single'):
        assert math.isfinite(speed[name]) and speed[name] > 0, name
    assert 'extrapolated' in capsys.readouterr().out
    # An existing --json is kept unless --overwrite is given.
    output.write_text('kept')
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*small, '--json', str(output)])
    assert exit_info.value.code == 2
    assert output.read_text() == 'kept'
