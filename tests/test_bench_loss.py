"""scripts/bench_loss.py at tiny sizes: it runs, prints its table and writes one record per implementation."""
import importlib.util
import json
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / 'scripts' / 'bench_loss.py'
FIELDS = {'impl', 'b', 'B', 'D', 'K', 'time_ms', 'peak_mem_mb'}


def load_script():
    spec = importlib.util.spec_from_file_location('bench_loss', SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_loss_records_time_and_memory_of_each_implementation(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv('OPEN_CLIP_LLIP_LOSS_IMPL', raising=False)
    bench = load_script()
    out = tmp_path / 'out.json'
    bench.main(['--b', '4', '--B', '8', '--warmup', '0', '--json', str(out)])
    records = json.loads(out.read_text())
    assert [(r['impl'], r['b'], r['B'], r['D'], r['K']) for r in records] == [
        ('direct', 4, 8, 512, 32), ('torch', 4, 8, 512, 32), ('siglip', 4, 8, 512, 32)]
    for record in records:
        assert FIELDS <= set(record)
        assert record['time_ms'] > 0 and record['peak_mem_mb'] > 0 and record['tflop_per_s'] > 0
    assert 'direct/256' in capsys.readouterr().out  # the table, naming the direct formulation's chunk
    assert bench.os.environ.get('OPEN_CLIP_LLIP_LOSS_IMPL') is None  # restored after each implementation


def test_memory_only_traces_peak_memory_without_running():
    """Peak memory alone, traced with fake tensors: the whole [b, B, D] at once against ours."""
    bench = load_script()
    records = bench.main(['--batch', '512', '--chunk', '0', '--impl', 'direct', 'torch', '--memory-only'])
    direct, ours = records
    assert direct['time_ms'] is None and ours['time_ms'] is None
    assert direct['peak_mem_mb'] > 512 ** 2 * 512 * 4 / 2 ** 20  # at least one [b, B, D] fp32 tensor
    assert ours['peak_mem_mb'] < direct['peak_mem_mb'] / 10
