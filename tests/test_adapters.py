"""The adapters stand in for the patches OpenCLIP lacks, each on its own, and leave alone what they do not recognise."""
import json
import os
import subprocess
import sys
import textwrap

import open_clip

# What each adapter replaces on a stock OpenCLIP (3.3, or 4 with its tasks).
REPLACED = {
    'registered_model_classes': ['open_clip.factory.CLIP', 'open_clip.factory.CustomTextCLIP', 'open_clip.load_checkpoint',
                                 'open_clip.get_model_config'],
    'registered_losses': ['open_clip.create_loss'],
    'similarity': ['open_clip.build_zero_shot_classifier', 'open_clip_train.train.evaluate',
                   'open_clip_train.zero_shot.' + ('run_zero_shot_classifier' if hasattr(open_clip, 'create_task')
                                                   else 'run')],
}
REPLACED['hub'] = ['open_clip.push_to_hf_hub', 'open_clip.push_to_hf_hub.save_config_for_hf']
REPLACED['safe_checkpoints'] = ['open_clip_train.main.main']  # swaps its saving and resuming during Llip runs only
REPLACED['download_errors'] = ['open_clip.factory.download_pretrained']
REPLACED['cpu_distributed'] = ['torch.nn.parallel.DistributedDataParallel.__init__']  # for a Llip model on the CPU
REPLACED['validation_data'] = ['open_clip_train.data.get_data']  # reads --val-data by its extension in Llip runs
REPLACED['model_kwargs'] = ['open_clip_train.main.parse_args', 'open_clip_train.main.main']  # wraps safe_checkpoints'
if hasattr(open_clip, 'create_task'):
    REPLACED['registered_tasks'] = ['open_clip.create_task']


def run_python(code: str) -> subprocess.CompletedProcess:
    """``code`` in a fresh interpreter with the import hook off: it breaks OpenCLIP first, then imports us."""
    environ = dict(os.environ, OPEN_CLIP_LLIP_AUTOLOAD='0')
    return subprocess.run([sys.executable, '-W', 'always', '-c', textwrap.dedent(code)], env=environ,
                          capture_output=True, text=True)


SHOW_MODULES = """
    import importlib, json
    import open_clip_train.train, open_clip_train.zero_shot
    def modules_of(path):  # the function's module, and those of the functions it wraps (adapters wrapping adapters)
        owner, _, name = path.rpartition('.')
        try:
            owner = importlib.import_module(owner)  # sys.modules: open_clip.push_to_hf_hub
        except ModuleNotFoundError:  # a class's method
            module, _, cls = owner.rpartition('.')
            owner = getattr(importlib.import_module(module), cls)
        function = getattr(owner, name)
        modules = [function.__module__]
        while hasattr(function, '__wrapped__'):
            function = function.__wrapped__
            modules.append(function.__module__)
        return modules
    print(json.dumps({path: modules_of(path) for paths in REPLACED.values() for path in paths}))
"""


def test_every_adapter_applies_to_a_stock_open_clip():
    result = run_python(f"""
        REPLACED = {REPLACED!r}
        import open_clip_llip
        {textwrap.indent(textwrap.dedent(SHOW_MODULES), '        ').strip()}
    """)
    assert result.returncode == 0, result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    for adapter, paths in REPLACED.items():
        for path in paths:
            assert f'open_clip_llip.integration.adapters.{adapter}' in modules[path], (path, modules[path])
    assert 'leaves OpenCLIP alone' not in result.stderr


def test_an_adapter_that_does_not_recognise_its_target_leaves_it_alone_and_warns_once():
    """create_loss without its `args` parameter: the losses adapter steps back; the others still apply."""
    result = run_python(f"""
        REPLACED = {REPLACED!r}
        import open_clip
        def create_loss(options):
            return 'the stock loss'
        open_clip.factory.create_loss = open_clip.create_loss = create_loss
        import open_clip_llip
        import open_clip_llip.integration.plugin
        open_clip_llip.integration.plugin.register()  # idempotent: no second warning
        assert open_clip.create_loss('x') == 'the stock loss'
        assert type(open_clip.create_model('Llip-Tiny')).__name__ == 'LlipModel'
        REPLACED.pop('registered_losses')
        {textwrap.indent(textwrap.dedent(SHOW_MODULES), '        ').strip()}
    """)
    assert result.returncode == 0, result.stderr
    assert result.stderr.count('leaves OpenCLIP alone') == 1, result.stderr
    assert "losses (patches/0002) adapter expects (open_clip.factory.create_loss takes no args" in result.stderr
    modules = json.loads(result.stdout.splitlines()[-1])
    assert all(chain[0].startswith('open_clip_llip.integration.adapters.') for chain in modules.values())


def test_llip_configs_stay_unbuildable_rather_than_half_adapted():
    """Without the class it dispatches from, the model-classes adapter changes nothing and says what is lost."""
    result = run_python("""
        import open_clip
        from open_clip import factory
        stock_load_checkpoint = factory.load_checkpoint
        del factory.CustomTextCLIP
        import open_clip_llip
        assert factory.load_checkpoint is stock_load_checkpoint and factory.CLIP is open_clip.CLIP
    """)
    assert result.returncode == 0, result.stderr
    assert 'Llip configs cannot be built by open_clip.create_model' in result.stderr
