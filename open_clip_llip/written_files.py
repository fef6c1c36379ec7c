"""Files a command writes, into a folder or as one file: where they may go, how they are written, and which
of them a later run may remove.

**Where.** Every path a command writes or removes under its folder is resolved by ``inside``: a plain relative
path (no ``..``, not absolute) that passes through no symbolic link, neither a subfolder nor the file itself.
Anything else is refused (``UnsafePathError``), so no command reads a path from a manifest, or follows a link
someone put in its folder, to a place outside that folder.

**How.** Every file is written beside its place under a temporary name (``.NAME.XXXXXXXX.tmp``, in the same
folder), flushed to disk (fsync) and renamed into place (``os.replace``): a kill at any moment leaves the old
file or the new one, never part of one. A command that writes one file the user names (``--json``) checks it
before doing any work (``check_output_file``) and replaces an existing file only when asked to (``--overwrite``).

**What may be removed.** A command that writes into a folder (``open_clip_llip data OUT``, ``index build OUT``,
the main job's ``--output``) records every file it wrote with its SHA-256 in a manifest (``WrittenFiles``),
and gives the pattern of the names it writes (``names``, a regular expression of relative POSIX paths).
Asked to overwrite (``prepare_folder``), it removes only the files it can prove it wrote: listed, of a name it
writes, a plain file (never a link; a link is not followed), holding what it recorded; and the temporaries of
a killed run, recognised by their name. A run killed before its manifest leaves a journal of what it wrote
(``journal_name``), which stands in for the manifest. If a file of ours was changed since, it refuses before
removing anything. Everything else stays, and is named in a warning. Writing never replaces an existing file,
and a run that fails removes what it wrote.

Not defended: a folder changed by someone else while the command runs (the checks are on paths, made just
before each write or removal, not on open folder handles).
"""
import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import tempfile
from pathlib import Path
from typing import Dict, List, Optional, Pattern, Union

# mkstemp's names: a prefix, 8 characters of this alphabet, a suffix. Ours: '.' + the file's name + '.' ... '.tmp'.
TEMPORARY = re.compile(r'\.(?P<name>.+)\.[a-z0-9_]{8}\.tmp')


class UnsafePathError(OSError):
    """A path a command would write or remove lies outside its folder, or passes through a symbolic link."""


def inside(root: Union[str, Path], relative: str) -> Path:
    """``root / relative``, where ``relative`` is a plain relative POSIX path and nothing on the way from ``root``
    (each subfolder, and the file) is a symbolic link; else UnsafePathError. ``root`` itself is the folder the
    user named, and may be a link."""
    root = Path(root)
    parts = relative.split('/') if isinstance(relative, str) else ['']
    if not isinstance(relative, str) or relative.startswith('/') or any(part in ('', '.', '..') for part in parts):
        raise UnsafePathError(f'{relative!r} is not a plain path inside {root} (a relative path, without ".."); '
                              'not touching it.')
    path = root
    for part in parts:
        path = path / part
        if path.is_symlink():
            raise UnsafePathError(f'{path} is a symbolic link; not writing or removing anything through it. Replace '
                                  'it by a folder of its own, or choose another folder.')
    return path


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, 'rb') as file:
        for block in iter(lambda: file.read(1 << 20), b''):
            digest.update(block)
    return digest.hexdigest()


def _sync(path: Path):
    """Flush what was written to ``path`` (by any code) to disk, so that a rename publishes whole content."""
    descriptor = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _temporary(path: Path) -> Path:
    """A new empty file beside ``path``, named '.NAME.XXXXXXXX.tmp' (``TEMPORARY``)."""
    descriptor, name = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(descriptor)
    return Path(name)


def _make_folders(root: Path, relative: str):
    """Create the folders of ``relative`` under ``root``, refusing any that is a link or a file."""
    path = root
    for part in relative.split('/')[:-1]:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            if path.is_symlink() or not path.is_dir():
                raise UnsafePathError(f'{path} is a symbolic link or a file, not a folder; not writing into it.') from None


class WrittenFiles:
    """What was written under ``root``: relative POSIX path -> SHA-256; every path of the form ``names``.

    Use as a context manager: if the block raises, every file recorded so far, and every temporary, is removed.
    With ``manifest`` (the file the command writes last, listing ``files``) and ``generator``, every file is also
    appended, as it is recorded, to a journal beside it (``journal_name``): a run killed before its manifest is
    written leaves that record, from which the next ``prepare_folder`` removes what it wrote. A run that ends
    removes its journal.
    """

    def __init__(self, root: Union[str, Path], names: Pattern, manifest: Optional[str] = None,
                 generator: Optional[str] = None):
        self.root = Path(root)
        self.names = names
        self.files: Dict[str, str] = {}
        self.pending: Dict[str, Path] = {}  # relative path -> its temporary, until ``record``
        self.journal = None
        if manifest is not None:
            path = inside(self.root, journal_name(manifest))
            self.journal = open(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), 'w',
                                encoding='utf-8', buffering=1)  # a line at a time: each reaches the system whole
            self.journal_path = path
            self.journal.write(json.dumps({'generator': generator}) + '\n')

    def _add(self, relative: str, digest: str):
        self.files[relative] = digest
        if self.journal is not None:
            self.journal.write(json.dumps([relative, digest]) + '\n')

    def _destination(self, relative: str) -> Path:
        if not self.names.fullmatch(relative):
            raise ValueError(f'{relative!r} is not a name this command writes ({self.names.pattern}); a bug: add it '
                             'to the pattern, so that --overwrite can remove it later.')
        path = inside(self.root, relative)
        if os.path.lexists(path):
            raise FileExistsError(f'{path} exists and was not written by this command; not replacing it. Move it '
                                  'away, or choose another folder.')
        _make_folders(self.root, relative)
        return path

    def claim(self, relative: str) -> Path:
        """A new temporary file beside ``relative``'s place, for other code to write (a tar writer, a memory map,
        a FAISS index, ``torch.save``, a plot); ``record(relative)`` then moves it into place. Until then a
        failure removes it, and a killed run leaves it under a name that the next ``prepare_folder`` removes."""
        temporary = _temporary(self._destination(relative))
        self.pending[relative] = temporary
        return temporary

    def record(self, relative: str) -> Path:
        """Record ``relative`` as written: a ``claim``ed file is flushed to disk and renamed into place; any other
        (written in place by other code, such as a training run) is recorded as it is."""
        path = inside(self.root, relative)
        if relative not in self.pending:
            if not self.names.fullmatch(relative) or not stat.S_ISREG(os.lstat(path).st_mode):
                raise ValueError(f'{path} is not a file of a name this command writes; not recording it.')
            self._add(relative, file_digest(path))
            return path
        temporary = self.pending[relative]
        _sync(temporary)
        digest = file_digest(temporary)
        if os.path.lexists(path):
            raise FileExistsError(f'{path} appeared while this command ran; not replacing it.')
        os.replace(temporary, path)
        del self.pending[relative]
        self._add(relative, digest)
        return path

    def write_bytes(self, relative: str, data: bytes) -> Path:
        with open(self.claim(relative), 'wb') as file:
            file.write(data)
        return self.record(relative)

    def write_text(self, relative: str, text: str) -> Path:
        return self.write_bytes(relative, text.encode('utf-8'))

    def record_tree(self, relative: str):
        """Record every plain file under folder ``relative``, which this command created and filled (links are
        neither followed nor recorded)."""
        top = inside(self.root, relative)
        for folder, subfolders, names in os.walk(top):  # os.walk follows no link to a folder
            subfolders.sort()
            for name in sorted(names):
                path = Path(folder) / name
                if stat.S_ISREG(os.lstat(path).st_mode) and not TEMPORARY.fullmatch(name):
                    self.record(path.relative_to(self.root).as_posix())

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if error is not None:
            for temporary in self.pending.values():
                if os.path.lexists(temporary):
                    os.unlink(temporary)
            remove_written(self.root, self.files, self.names, check=False)
        if self.journal is not None:
            self.journal.close()
            os.unlink(self.journal_path)
        return False


def journal_name(manifest: str) -> str:
    return f'.{manifest}.partial'


def _read_journal(path: Path, generator: str) -> Optional[Dict[str, str]]:
    """The files a killed run listed in its journal at ``path`` (not a link), if ``generator`` wrote it; a line
    cut by the kill is left out (its file, if any, stays: it is not provably ours)."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding='utf-8') as file:
            lines = file.read().split('\n')
        if json.loads(lines[0]) != {'generator': generator}:
            return None
    except (OSError, ValueError):
        return None
    files = {}
    for line in lines[1:]:
        try:
            relative, digest = json.loads(line)
        except ValueError:  # the last line, cut (or the empty string after the last newline)
            continue
        files[relative] = digest
    return files


def remove_written(root: Union[str, Path], files: Dict[str, str], names: Pattern, check: bool = True) -> List[str]:
    """Remove the recorded ``files`` under ``root`` that are provably ours, then the folders that this leaves
    empty (never ``root``). Returns why each of the others was left.

    Ours: a path ``inside`` root, of the form ``names``, a plain file (a link is never followed, nor removed). With
    ``check``, first make sure that every such file still holds what was written: FileExistsError naming the
    first one that does not, and nothing is removed.
    """
    root = Path(root)
    ours, left = [], []
    for relative, digest in files.items():
        try:
            path = inside(root, relative)
        except UnsafePathError as error:
            left.append(str(error))
            continue
        if not names.fullmatch(relative):
            left.append(f'{path}: not a name that this command writes; not removing it.')
            continue
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            continue
        if not stat.S_ISREG(mode):
            left.append(f'{path} is not a plain file; not removing it.')
            continue
        if check and file_digest(path) != digest:
            raise FileExistsError(
                f'{path} was changed after this command wrote it; not removing it, nor anything else. Move it away, '
                'or choose another folder.')
        ours.append(relative)
    _remove(root, ours)
    return list(dict.fromkeys(left))  # once each: every entry under one link gives the same reason


def _remove(root: Path, relatives: List[str]):
    """Unlink ``root / relative`` for each (checked by the caller), then the folders this leaves empty."""
    folders = set()
    for relative in relatives:
        os.unlink(root / relative)
        parts = relative.split('/')
        folders.update('/'.join(parts[:end]) for end in range(1, len(parts)))
    for folder in sorted(folders, key=lambda f: f.count('/'), reverse=True):  # deepest first
        path = root / folder
        if not path.is_symlink() and path.is_dir() and not any(path.iterdir()):
            os.rmdir(path)


def _temporaries(folder: Path, names: Pattern) -> List[str]:
    """The temporaries that a killed run of the command writing ``names`` left under ``folder``."""
    found = []
    for parent, _, files in os.walk(folder):
        for name in files:
            match = TEMPORARY.fullmatch(name)
            path = Path(parent) / name
            relative = path.relative_to(folder).as_posix()
            destination = relative[:-len(name)] + match['name'] if match else None
            if match and names.fullmatch(destination) and stat.S_ISREG(os.lstat(path).st_mode):
                found.append(relative)
    return found


def _everything(folder: Path) -> List[str]:
    """Every entry under ``folder`` but the folders themselves (links included, not followed)."""
    return sorted(Path(parent, name).relative_to(folder).as_posix() for parent, subfolders, files in os.walk(folder)
                  for name in files + [s for s in subfolders if Path(parent, s).is_symlink()])


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
    if os.path.lexists(path) and not overwrite:  # a link too: it would be replaced, never written through
        raise FileExistsError(f'{path} exists; pass --overwrite to replace it, or another {option} path.')


@contextlib.contextmanager
def whole_file(path: Union[str, Path], overwrite: bool = True):
    """Write ``path`` whole or not at all: yields a binary file open on a temporary file beside ``path``; when the
    block ends, it is flushed to disk and renamed over ``path`` (so a kill at any moment leaves the old file or the
    new one), and the rename is flushed too where the folder allows. A link at ``path`` is replaced, not written
    through. On an error, or where ``path`` appeared meanwhile and not ``overwrite``, the temporary file is
    removed and ``path`` left as it was."""
    path = Path(path)
    temporary = _temporary(path)
    try:
        with open(temporary, 'wb') as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
        if os.path.lexists(path) and not overwrite:
            raise FileExistsError(f'{path} appeared while this command ran; pass --overwrite to replace it.')
        os.replace(temporary, path)
    except BaseException:
        if os.path.lexists(temporary):
            os.unlink(temporary)
        raise
    try:  # not every file system lets a folder be opened
        folder = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(folder)
    except OSError:
        pass
    finally:
        os.close(folder)


def write_json(path: Path, data: dict, overwrite: bool):
    """``data`` as JSON at ``path``, whole or not at all (``whole_file``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with whole_file(path, overwrite) as file:
        file.write(json.dumps(data, indent=2, ensure_ascii=False).encode('utf-8'))


def _read_manifest(path: Path, generator: str):
    """The manifest at ``path`` (not a link: ``inside`` checked) if ``generator`` wrote it, else None."""
    try:
        with open(os.open(path, os.O_RDONLY | os.O_NOFOLLOW), encoding='utf-8') as file:
            manifest = json.load(file)
        return manifest if manifest.get('generator') == generator else None
    except (OSError, ValueError, AttributeError):
        return None


def prepare_folder(folder: Path, manifest: str, generator: str, overwrite: bool, names: Pattern, what: str = 'output',
                   option: str = '--overwrite (overwrite=True)'):
    """Make ``folder`` ready to write into: new or empty, or, with ``overwrite``, holding what ``generator`` wrote.

    ``generator``'s earlier output is recognised by its ``manifest`` file (JSON with ``"generator"`` and the
    ``files`` it wrote, with their SHA-256), or that of a killed run by its journal: the files they list that are
    provably ours (``remove_written``: of
    the form ``names``, plain files inside ``folder``, unchanged), the temporaries of a killed run (named after a
    file of the form ``names``) and the manifest are removed, and nothing else; what else is there is named in a
    warning. A non-empty folder without our manifest (only our temporaries aside) is refused (FileExistsError), and
    so is one where a file of ours was changed, before anything is removed. ``what`` (a noun: 'dataset', 'index')
    and ``option`` (how to ask for ``overwrite``) make the messages specific.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f'{folder} exists and is not a folder; choose a folder to write the {what} into.')
    if folder.is_dir() and any(folder.iterdir()):
        if not overwrite:
            raise FileExistsError(f'{folder} is not empty; choose a new or empty folder, or pass {option} to replace '
                                  f'an earlier {what} that {generator} wrote there.')
        temporaries = _temporaries(folder, names)
        record, journal = inside(folder, manifest), inside(folder, journal_name(manifest))
        previous, killed = _read_manifest(record, generator), _read_journal(journal, generator)
        if previous is None and killed is None and set(_everything(folder)) - set(temporaries):
            raise FileExistsError(f'{folder} is not empty and holds nothing that {generator} wrote (no {manifest} '
                                  f'listing the files of its {what}); not overwriting it: choose a new or empty folder.')
        if previous is not None and not isinstance(previous.get('files'), dict):
            raise FileExistsError(f'{record} does not list the files it wrote (an older version of {generator} '
                                  'wrote it), so which files are its own is unknown; remove them yourself, or choose '
                                  'a new or empty folder.')
        listed = {**(killed or {}), **(previous['files'] if previous is not None else {})}
        left = remove_written(folder, listed, names)  # only provably ours, if unchanged
        found = [manifest] * (previous is not None) + [journal_name(manifest)] * (killed is not None)
        _remove(folder, found + temporaries)
        rest = _everything(folder)
        if left or rest:
            shown = ', '.join(rest[:20]) + (f' and {len(rest) - 20} more' if len(rest) > 20 else '')
            logging.warning(f'{folder}: left in place, not written by {generator} (or not provably): '
                            + ' '.join(left) + (f' Files: {shown}.' if rest else ''))
    folder.mkdir(parents=True, exist_ok=True)
