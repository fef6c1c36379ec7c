"""``open_clip_llip``: the package's command line, one subcommand per job (also ``python -m open_clip_llip``).

    open_clip_llip data OUTPUT_DIR              write the built-in dataset (``commands.data``)
    open_clip_llip eval --model … --pretrained …  zero-shot classification and retrieval (``commands.evaluate``)
    open_clip_llip index build|query …          a retrieval index of images (``commands.index``)
    open_clip_llip benchmark eval …             CLIP_benchmark's own command with Llip's scores (``commands.benchmark``)

Training stays OpenCLIP's own command, ``open_clip_train`` (``commands.train``). Every subcommand spells
the options they share alike (``commands.options``).
"""
import importlib
import sys

# subcommand -> (module of this package, what it does)
SUBCOMMANDS = {
    'data': ('data', 'write the built-in scenes dataset (training shards, retrieval set, zero-shot tasks)'),
    'eval': ('evaluate', 'zero-shot classification and retrieval of a Llip (or OpenCLIP) model'),
    'index': ('index', 'build a retrieval index of images, or search one by text'),
    'benchmark': ('benchmark', "CLIP_benchmark's own command line, scoring Llip models with conditioned cosines"),
}
PROG = 'open_clip_llip'


def usage() -> str:
    width = max(map(len, SUBCOMMANDS))
    lines = [f'usage: {PROG} {{{",".join(SUBCOMMANDS)}}} ...', '', 'subcommands:']
    lines += [f'  {name.ljust(width)}  {text}' for name, (_, text) in SUBCOMMANDS.items()]
    lines += ['', f'{PROG} SUBCOMMAND --help says more; training is open_clip_train (OpenCLIP\'s own arguments).']
    return '\n'.join(lines)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ('-h', '--help'):
        print(usage())
        return
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        sys.exit(f'{usage()}\n\n{PROG}: error: unknown subcommand {name!r}; choose one of {", ".join(SUBCOMMANDS)}.')
    importlib.import_module(f'{__name__}.{SUBCOMMANDS[name][0]}').main(rest)
