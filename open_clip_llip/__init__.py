"""Llip (Latent Language Image Pretraining) for OpenCLIP.

Importing this package registers the Llip model configs and model class with ``open_clip``;
an installed package also does so by itself whenever ``open_clip`` is imported (see README).
"""
from .evaluation.retrieval import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics
from .evaluation.tasks import RetrievalTask, ZeroShotTask, evaluate, load_model
from .evaluation.zero_shot import run_zero_shot, topk_correct, zero_shot_cosine
from .integration.plugin import register
from .loss.sigmoid import LlipLoss
from .modeling.checkpoint import convert_authors_config, convert_state_dict, load_checkpoint
from .modeling.classifier import build_zero_shot_classifier
from .modeling.config import LlipCfg
from .modeling.features import pack_image, pack_text, unpack_image, unpack_text
from .modeling.llip_model import LlipModel, llip_model_names
from .modeling.mixer import LlipMixer, TextQueryHead
from .modeling.scoring import conditioned_cosine
from .modeling.vision import MixtureTokenViT
from .version import __version__

__all__ = [
    '__version__', 'LlipCfg', 'LlipLoss', 'LlipMixer', 'LlipModel', 'MixtureTokenViT', 'RetrievalTask', 'TextQueryHead',
    'ZeroShotTask', 'build_zero_shot_classifier', 'conditioned_cosine', 'convert_authors_config', 'convert_state_dict',
    'encode_images', 'encode_texts', 'evaluate', 'evaluate_retrieval', 'llip_model_names', 'load_checkpoint',
    'load_model', 'pack_image', 'pack_text', 'register', 'retrieval_metrics', 'run_zero_shot', 'topk_correct',
    'unpack_image', 'unpack_text', 'zero_shot_cosine',
]

register()
