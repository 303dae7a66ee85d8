"""Choices and defaults the ``python -m train.eval`` parser shows, apart from the analyses themselves:
building the parser imports no torch, so ``study`` (which needs none) starts at once."""

from __future__ import annotations

from ..config import RunConfig

#: attention: text-query rows over the image (the paper's upper-right block), or image-query columns
DIRECTIONS = ("text-to-image", "image-to-text")
#: collapse: a pair is flagged at this student cosine (the trainer's own probe threshold)
DEFAULT_THRESHOLD = RunConfig().collapse_threshold
