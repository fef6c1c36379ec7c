"""Files a command wrote into a folder, recorded so that ``--overwrite`` removes exactly those.

A command that writes one file the user names (``--json``) checks it before doing any work
(``check_output_file``) and writes it whole or not at all (``write_json``); it replaces an
existing file only when asked to (``--overwrite``).

A command that writes into a folder the user names (``open_clip_llip data OUT``, the
main job's ``--output``) keeps a record of every file it wrote and what it held (SHA-256). Asked
to overwrite, it removes those files and nothing else: a file the user put there stays, and a
file of ours that was changed since is not removed (the command refuses, before removing
anything). Writing never replaces an existing file, and a run that fails removes what it wrote.
"""
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Union


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


class WrittenFiles:
    """What was written under ``root``: relative POSIX path -> SHA-256.

    Use as a context manager: if the block raises, every file recorded so far is removed again.
    """

    def __init__(self, root: Union[str, Path]):
        self.root = Path(root)
        self.files: Dict[str, str] = {}

    def path(self, relative: str) -> Path:
        """The path to write ``relative`` to; FileExistsError if something is there already (ours are never replaced)."""
        path = self.root / relative
        if path.exists():
            raise FileExistsError(f'{path} exists and was not written by this command; not replacing it. Move it '
                                  'away, or choose another folder.')
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_bytes(self, relative: str, data: bytes) -> Path:
        path = self.path(relative)
        with open(path, 'xb') as file:
            file.write(data)
        self.files[relative] = hashlib.sha256(data).hexdigest()
        return path

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode('utf-8'))

    def claim(self, relative: str) -> Path:
        """``path``, for a file that other code writes (a memory map, a FAISS index): recorded as ours at once, so
        that a failure before ``record`` removes it too."""
        path = self.path(relative)
        self.files[relative] = ''  # no content yet: ``record`` it once written
        return path

    def record(self, relative: str):
        """Record a file that was written under ``root`` by other code (a tar writer, a training run)."""
        self.files[relative] = file_digest(self.root / relative)

    def record_tree(self, relative: str):
        """Record every file under folder ``relative``, which this command created and filled."""
        for path in sorted((self.root / relative).rglob('*')):
            if path.is_file():
                self.record(path.relative_to(self.root).as_posix())

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:
            remove_written(self.root, self.files, check=False)
        return False


def remove_written(root: Union[str, Path], files: Dict[str, str], check: bool = True):
    """Remove the recorded ``files`` under ``root``, then the folders that this leaves empty (never ``root``).

    With ``check``, first make sure that every recorded file still holds what was written:
    FileExistsError naming the first one that does not, and nothing is removed.
    """
    root = Path(root)
    present = [relative for relative in files if (root / relative).is_file()]
    if check:
        for relative in present:
            if file_digest(root / relative) != files[relative]:
                raise FileExistsError(
                    f'{root / relative} was changed after this command wrote it; not removing it, nor anything else. '
                    'Move it away, or choose another folder.')
    folders = set()
    for relative in present:
        (root / relative).unlink()
        folders.update(parent for parent in (root / relative).parents if root in parent.parents)
    for folder in sorted(folders, key=lambda f: len(f.parts), reverse=True):  # deepest first
        if folder.is_dir() and not any(folder.iterdir()):
            os.rmdir(folder)


def add_json_output(parser, what: str = 'the figures'):
    """``--json PATH`` and ``--overwrite``, as every command and script here takes them."""
    parser.add_argument('--json', type=Path, metavar='PATH', help=f'Also write {what} here, as JSON.')
    parser.add_argument('--overwrite', action='store_true', help='Replace an existing --json file.')


def check_json_output(parser, args):
    """Before any work: ``args.json`` (if given) must be a new file path, unless ``--overwrite``; else a usage error."""
    if args.json is not None:
        try:
            check_output_file(args.json, args.overwrite)
        except OSError as error:
            parser.error(str(error))


def check_output_file(path: Path, overwrite: bool, option: str = '--json'):
    """Before any work: ``path`` must be a file path, and new unless ``overwrite``."""
    if path.is_dir():
        raise IsADirectoryError(f'{option} {path} is a folder; give a file path.')
    if path.exists() and not overwrite:
        raise FileExistsError(f'{path} exists; pass --overwrite to replace it, or another {option} path.')


def write_json(path: Path, data: dict, overwrite: bool):
    """Write to a temporary file beside ``path``, then rename it: ``path`` is left whole or untouched."""
    text = json.dumps(data, indent=2, ensure_ascii=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    try:
        with os.fdopen(descriptor, 'w', encoding='utf-8') as file:
            file.write(text)
        if path.exists() and not overwrite:
            raise FileExistsError(f'{path} appeared while this command ran; pass --overwrite to replace it.')
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def prepare_folder(folder: Path, manifest: str, generator: str, overwrite: bool, what: str = 'output',
                   option: str = '--overwrite (overwrite=True)'):
    """Make ``folder`` ready to write into: new or empty, or, with ``overwrite``, holding what ``generator`` wrote.

    ``generator``'s earlier output is recognised by its ``manifest`` file (JSON with ``"generator"`` and the
    ``files`` it wrote, with their SHA-256): those files, if unchanged, and the manifest are removed, and nothing
    else. Anything else in a non-empty folder is refused (FileExistsError), before anything is removed. ``what``
    (a noun: 'dataset', 'index') and ``option`` (how to ask for ``overwrite``) make the messages specific.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f'{folder} exists and is not a folder; choose a folder to write the {what} into.')
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f'{folder} is not empty; choose a new or empty folder, or pass {option} to replace '
                                  f'an earlier {what} that {generator} wrote there.')
        try:
            previous = json.loads((folder / manifest).read_text(encoding='utf-8'))
            ours = previous.get('generator') == generator
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(f'{folder} is not empty and holds nothing that {generator} wrote (no {manifest} '
                                  f'listing the files of its {what}); not overwriting it: choose a new or empty folder.')
        if not isinstance(previous.get('files'), dict):
            raise FileExistsError(f'{folder / manifest} does not list the files it wrote (an older version of '
                                  f'{generator} wrote it), so which files are its own is unknown; remove them '
                                  'yourself, or choose a new or empty folder.')
        remove_written(folder, previous['files'])  # only what the manifest lists, if unchanged
        (folder / manifest).unlink()
    folder.mkdir(parents=True, exist_ok=True)
