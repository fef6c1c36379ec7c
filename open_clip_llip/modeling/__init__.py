"""Llip's model: towers, mixer, scores, configs and checkpoint layouts (docs/method.md).

The bottom layer: it knows OpenCLIP's model library and nothing of training, evaluation or search.
"""
