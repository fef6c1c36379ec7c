"""Evaluation with conditioned scores: zero-shot classification, retrieval, the readers of evaluation data, and the
typed tasks that run them (``tasks``)."""
