"""Llip (Latent Language Image Pretraining) for OpenCLIP.

Importing this package registers the Llip model configs and model class with ``open_clip``;
an installed package also does so by itself whenever ``open_clip`` is imported (see README).
"""
from .checkpoint import convert_authors_config, convert_state_dict, load_checkpoint
from .config import LlipCfg
from .evaluation import RetrievalTask, ZeroShotTask, evaluate, load_model
from .features import pack_image, pack_text, unpack_image, unpack_text
from .loss import LlipLoss
from .mixer import LlipMixer, TextQueryHead
from .model import LlipModel
from .plugin import llip_model_names, register
from .retrieval import encode_images, encode_texts, evaluate_retrieval, retrieval_metrics
from .scoring import conditioned_cosine
from .version import __version__
from .vision import MixtureTokenViT
from .zero_shot import build_zero_shot_classifier, run_zero_shot, topk_correct, zero_shot_cosine

__all__ = [
    '__version__', 'LlipCfg', 'LlipLoss', 'LlipMixer', 'LlipModel', 'MixtureTokenViT', 'RetrievalTask', 'TextQueryHead',
    'ZeroShotTask', 'build_zero_shot_classifier', 'conditioned_cosine', 'convert_authors_config', 'convert_state_dict',
    'encode_images', 'encode_texts', 'evaluate', 'evaluate_retrieval', 'llip_model_names', 'load_checkpoint',
    'load_model', 'pack_image', 'pack_text', 'register', 'retrieval_metrics', 'run_zero_shot', 'topk_correct',
    'unpack_image', 'unpack_text', 'zero_shot_cosine',
]

register()
