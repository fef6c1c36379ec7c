"""A Llip run's initialisation as its config says, or as ``--model-kwargs`` sets it; ``--siglip`` changes none of it.

``open_clip_train``'s ``main`` builds the model with ``create_model_and_transforms(args.model, …,
**model_kwargs)``, where ``model_kwargs`` is empty, or, with ``--siglip``, SigLIP's initialisation
(``init_logit_scale = log 10``, ``init_logit_bias = -10``), which overrides the config's. OpenCLIP 3.3
and 4.2 have no option to pass other keyword arguments. For a run whose ``--model`` is a Llip config
(and only then), this adapter replaces two names in ``open_clip_train.main``:

- ``parse_args``: also takes ``--model-kwargs JSON``, a JSON object of ``LlipModel`` keyword arguments
  (``'{"init_logit_bias": -5}'``), kept as ``args.model_kwargs`` (so the run's log and ``params.txt``
  record it); without a Llip ``--model`` the option stays unknown, as in OpenCLIP;
- ``create_model_and_transforms``, for the duration of the run (``main`` is wrapped): the model of
  ``--model`` is built without ``--siglip``'s initialisation — a Llip model trains with the sigmoid
  loss whatever ``--siglip`` says, and keeps its configured initialisation — and with
  ``--model-kwargs``, which override the config. Each change is logged; ``LlipModel`` logs the
  values it was initialised with.

It covers the ``open_clip_train`` command, ``python -m open_clip_train.main`` (``autoload.run_as_import``)
and any call of ``open_clip_train.main.main``.

No upstream patch goes with this adapter yet: ``--model-kwargs`` would suit OpenCLIP for every model,
and whether a config's initialisation should win over ``--siglip``'s is OpenCLIP's call.
"""
import inspect
import json
import logging

from ...modeling.llip_model import LlipModel
from . import Unexpected, expect_function, is_llip_model, leave_alone

ADAPTER = 'model keyword arguments'
OPTION = '--model-kwargs'
# What open_clip_train's main passes to create_model_and_transforms for --siglip.
SIGLIP_INITIALISATION = ('init_logit_scale', 'init_logit_bias')
# LlipModel's keyword arguments that a run may set (precision and the output format are the loop's).
SETTABLE = tuple(name for name in inspect.signature(LlipModel).parameters if name not in ('cast_dtype', 'output_dict'))


def split_option(argv):
    """(argv without ``--model-kwargs`` and its value, the value or None)."""
    rest, text, arguments = [], None, list(argv)
    while arguments:
        argument = arguments.pop(0)
        if argument == OPTION and arguments:
            text = arguments.pop(0)
        elif argument.startswith(OPTION + '='):
            text = argument[len(OPTION) + 1:]
        else:
            rest.append(argument)
    return rest, text


def parse_model_kwargs(text: str) -> dict:
    """The keyword arguments of a ``--model-kwargs`` JSON object; SystemExit saying what is wrong otherwise."""
    try:
        kwargs = json.loads(text)
    except json.JSONDecodeError as error:
        raise SystemExit(f'error: {OPTION} {text!r} is not JSON ({error}); give a JSON object, such as '
                         '\'{"init_logit_bias": -5}\'.') from None
    if not isinstance(kwargs, dict):
        raise SystemExit(f'error: {OPTION} {text!r} must be a JSON object of keyword arguments, such as '
                         '\'{"init_logit_bias": -5}\'.')
    unknown = sorted(set(kwargs) - set(SETTABLE))
    if unknown:
        raise SystemExit(f'error: {OPTION}: {", ".join(unknown)} is not a keyword argument of a Llip model; it takes '
                         f'{", ".join(SETTABLE)}.')
    return kwargs


def adapt(main_module):
    """Called once ``open_clip_train.main`` has loaded: replace its ``parse_args`` and wrap its ``main``."""
    try:
        stock_main = expect_function(main_module, 'main', ('args',))
        stock_parse_args = expect_function(main_module, 'parse_args', ('args',))
        stock_create = expect_function(main_module, 'create_model_and_transforms', ('model_name',))
    except Unexpected as error:
        leave_alone(ADAPTER, error, f'{OPTION} is unknown, and --siglip sets SigLIP\'s initialisation of a Llip model')
        return

    def parse_args(args):
        rest, text = split_option(args)
        if text is None:
            return stock_parse_args(args)
        parsed = stock_parse_args(rest)
        if not is_llip_model(parsed.model):
            return stock_parse_args(args)  # OpenCLIP's answer to an option it does not know
        parsed.model_kwargs = parse_model_kwargs(text)
        return parsed

    def main(args):
        """OpenCLIP's ``main(args)``; for a Llip ``--model``, the model built as the module docstring says."""
        parsed = parse_args(args)
        if not is_llip_model(parsed.model):
            return stock_main(args)
        main_module.create_model_and_transforms = _creating(stock_create, parsed)
        try:
            return stock_main(args)
        finally:
            main_module.create_model_and_transforms = stock_create

    main.__wrapped__ = stock_main  # (not functools.wraps: the function is ours, not OpenCLIP's)
    main_module.parse_args = parse_args
    main_module.main = main


def _creating(stock_create, args):
    def create_model_and_transforms(model_name, *rest, **kwargs):
        if model_name == args.model:
            dropped = {key: kwargs.pop(key) for key in SIGLIP_INITIALISATION if args.siglip and key in kwargs}
            if dropped:
                logging.info(f'--siglip: {model_name} keeps its configured initialisation (a Llip model trains with the '
                             f'sigmoid loss anyway); OpenCLIP\'s SigLIP values {_describe(dropped)} are not applied.')
            overrides = getattr(args, 'model_kwargs', {})
            if overrides:
                logging.info(f'{OPTION}: {model_name} is built with {_describe(overrides)}, over its config.')
                kwargs.update(overrides)
        return stock_create(model_name, *rest, **kwargs)
    return create_model_and_transforms


def _describe(kwargs: dict) -> str:
    return ', '.join(f'{key} = {value:.6g}' if isinstance(value, float) else f'{key} = {value!r}'
                     for key, value in kwargs.items())
