"""Llip's training loss: the sigmoid loss on conditioned scores, in PyTorch (``sigmoid``) and fused in Triton (``fused``)."""
