"""``--val-data`` read by its own type in a Llip run, and a validation CSV checked before the first step.

OpenCLIP's ``get_data`` reads ``--train-data`` and ``--val-data`` with one reader, the one
``--dataset-type`` names: with webdataset training shards (``--dataset-type webdataset``, as the
README's command and the SLURM recipes use), a validation CSV goes to the webdataset reader, which
logs one warning ("invalid header") and yields nothing, and the run trains without ever validating.

For a run whose ``--model`` is a Llip config (and only then: other runs get OpenCLIP's ``get_data``
untouched), ``open_clip_train.data.get_data`` is replaced: ``--val-data`` ending in ``.csv`` or ``.tsv``
is read by OpenCLIP's own CSV reader (``get_csv_dataset``: ``--csv-separator``, ``--csv-img-key``,
``--csv-caption-key``) and one ending in ``.tar`` by its webdataset reader — the choice
``--dataset-type auto`` makes from the extension — whatever ``--dataset-type`` says for the training
data; any other ``--val-data`` is read as ``--dataset-type`` says. A local validation CSV is checked
first, and refused with a message (before the first step) when it is missing, lacks either column,
has no rows, or names image files that do not exist (OpenCLIP opens them relative to the working
directory). A run with neither ``--val-data`` nor ``--imagenet-val`` says that it validates nothing.

No upstream patch goes with this adapter: reading ``--val-data`` by its extension would change
OpenCLIP's behaviour for every model, which is OpenCLIP's call.
"""
import logging
import os
from pathlib import Path

from . import Unexpected, expect_function, is_llip_model, leave_alone

ADAPTER = 'validation data'
# The reader ``--dataset-type auto`` picks from a path's extension (open_clip_train.data.get_dataset_fn).
READER_BY_EXTENSION = {'csv': 'csv', 'tsv': 'csv', 'tar': 'webdataset'}


def adapt(data_module):
    """Called once ``open_clip_train.data`` has loaded: wrap its ``get_data``."""
    try:
        stock_get_data = expect_function(data_module, 'get_data', ('args', 'preprocess_fns', 'epoch', 'tokenizer'))
        get_dataset_fn = expect_function(data_module, 'get_dataset_fn', ('data_path', 'dataset_type'))
        csv_dataset = data_module.CsvDataset
    except (Unexpected, AttributeError) as error:
        leave_alone(ADAPTER, Unexpected(str(error)), 'a --val-data CSV with --dataset-type webdataset is not validated')
        return

    def get_data(args, preprocess_fns, epoch=0, tokenizer=None, **options):
        llip = is_llip_model(args.model)
        if llip and not (args.val_data or getattr(args, 'imagenet_val', None)):
            logging.warning('This run validates nothing: give --val-data (a CSV or shards of image-caption pairs) '
                            'for retrieval metrics and --imagenet-val for zero-shot accuracy during training.')
        reader = READER_BY_EXTENSION.get(str(args.val_data).split('.')[-1]) if args.val_data else None
        if reader is None or not llip:
            return stock_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, **options)
        if reader == 'csv':
            check_csv_header(args.val_data, args.csv_separator, args.csv_img_key, args.csv_caption_key)
        if args.dataset_type in (reader, 'auto'):
            data = stock_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, **options)
        else:
            logging.info(f'--val-data {args.val_data} is read as {reader} data (from its extension), the training '
                         f'data as --dataset-type {args.dataset_type} says.')
            val_data, args.val_data = args.val_data, None
            try:
                data = stock_get_data(args, preprocess_fns, epoch=epoch, tokenizer=tokenizer, **options)
            finally:
                args.val_data = val_data
            data['val'] = get_dataset_fn(val_data, reader)(args, preprocess_fns[1], is_train=False, tokenizer=tokenizer,
                                                           **options)
        dataset = data['val'].dataloader.dataset
        if isinstance(dataset, csv_dataset):
            check_csv_rows(args.val_data, [str(path) for path in dataset.images])
        return data

    data_module.get_data = get_data


def _is_remote(path: str) -> bool:
    return '://' in path or path.startswith('pipe:')


def check_csv_header(path: str, separator: str, image_key: str, caption_key: str):
    """FileNotFoundError or ValueError unless the CSV at ``path`` has both columns OpenCLIP's CsvDataset reads."""
    if _is_remote(path):
        return
    if not os.path.isfile(path):
        raise FileNotFoundError(f'--val-data {path} not found.')
    import pandas as pd
    try:
        columns = list(pd.read_csv(path, sep=separator, nrows=0).columns)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ValueError(f'--val-data {path} cannot be read as a CSV ({error}).') from None
    missing = [key for key in (image_key, caption_key) if key not in columns]
    if missing:
        raise ValueError(
            f'--val-data {path} has the columns {columns} (separated by {separator!r}); it needs {image_key!r} (image '
            f'path) and {caption_key!r} (caption). Name its columns with --csv-img-key and --csv-caption-key, its '
            'separator with --csv-separator.')


def check_csv_rows(path: str, image_files):
    """ValueError if the validation CSV has no rows, or names local image files that do not exist."""
    if not image_files:
        raise ValueError(f'--val-data {path} has no rows: there is nothing to validate on.')
    missing = sorted({file for file in image_files if not _is_remote(file) and not os.path.isfile(file)})
    if missing:
        beside_csv = [file for file in missing if (Path(path).parent / file).is_file()]
        hint = (f' They exist relative to the CSV\'s folder ({Path(path).parent}): write them relative to the working '
                'directory or as absolute paths.' if beside_csv else '')
        raise ValueError(
            f'--val-data {path} names {len(missing)} image file(s) that do not exist, e.g. {missing[:3]}; OpenCLIP '
            f'opens them relative to the working directory ({os.getcwd()}).{hint}')
