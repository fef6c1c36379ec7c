"""Stand-in for patches 0006 and main/0005: a model saved for, or pushed to, the Hugging Face Hub says what loading it needs.

A model names the packages it needs besides ``open_clip_torch`` in ``hub_requirements`` (Llip:
``open_clip_llip``; without it, loading fails on the config's ``model_class``). In
``open_clip.push_to_hf_hub`` (the module):

- ``save_config_for_hf`` (which ``save_for_hf`` calls) also writes them under ``"requires"`` in
  ``open_clip_config.json``;
- ``push_to_hf_hub`` (also ``open_clip.push_to_hf_hub``, which ``push_pretrained_to_hf_hub``
  calls) adds them to the model card's tags and a "Requirements" note to its description.

Models without ``hub_requirements`` are saved and described as before.
"""
import importlib
import inspect
import json

import open_clip

from . import Unexpected, expect_function, leave_alone

ADAPTER = 'hub (patches/0006)'


def install():
    hub = importlib.import_module('open_clip.push_to_hf_hub')  # `open_clip.push_to_hf_hub` is also the function
    try:
        generate_readme = expect_function(hub, 'generate_readme', ('model_card', 'model_name'))
        if 'requirements' in inspect.signature(generate_readme).parameters:
            return  # the patch is in
        stock_save_config = expect_function(hub, 'save_config_for_hf', ('model', 'config_path', 'model_config'))
        stock_push = expect_function(hub, 'push_to_hf_hub', ('model', 'tokenizer', 'model_config', 'repo_id',
                                                              'model_card'))
        expect_function(hub, 'save_for_hf')
    except Unexpected as error:
        leave_alone(ADAPTER, error, 'a Llip model pushed to the Hub does not say that loading it needs open_clip_llip')
        return

    def save_config_for_hf(model, config_path, model_config):
        stock_save_config(model, config_path, model_config)
        requirements = list(getattr(model, 'hub_requirements', ()))
        if requirements:
            config = json.loads(config_path.read_text())
            config['requires'] = requirements
            config_path.write_text(json.dumps(config, indent=2))

    signature = inspect.signature(stock_push)

    def push_to_hf_hub(*args, **kwargs):
        arguments = signature.bind(*args, **kwargs)
        requirements = list(getattr(arguments.arguments['model'], 'hub_requirements', ()))
        if requirements:
            card = dict(arguments.arguments.get('model_card') or {})
            tags = list(card.get('tags', ('clip',)))
            card['tags'] = tags + [r for r in requirements if r not in tags]
            note = ('Loading this model with OpenCLIP needs these packages besides `open_clip_torch`: '
                    f"`pip install {' '.join(requirements)}`.")
            card['description'] = f"{card['description']}\n\n{note}" if 'description' in card else note
            arguments.arguments['model_card'] = card
        return stock_push(*arguments.args, **arguments.kwargs)

    hub.save_config_for_hf = save_config_for_hf
    hub.push_to_hf_hub = open_clip.push_to_hf_hub = push_to_hf_hub
