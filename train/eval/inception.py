"""The Inception-v3 network FID is defined with, up to its 2048-dim pool features, in plain torch.

This is pytorch-fid's ``FIDInceptionV3`` (the TensorFlow FID graph ported to torchvision's Inception3
layout: average pools that leave padding out, a max pool in the last block's pool branch, 1008 classes),
written out without torchvision, so it loads pytorch-fid's weights file
``pt_inception-2015-12-05-6726825d.pth`` by the same parameter names and gives the same features.
Nothing is downloaded: the file is given with ``--inception`` or ``$FASTENC_FID_INCEPTION``.

Input (as pytorch-fid's ``fid_score``): RGB in [0, 1], [N, 3, H, W] floats; each image is resized to
299 x 299 with ``F.interpolate(mode="bilinear", align_corners=False)`` (no antialiasing) and scaled to
[-1, 1]. Output: [N, 2048], the global average pool after ``Mixed_7c``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fastenc.errors import ConfigError

log = logging.getLogger("fastenc.train")

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = f"https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/{WEIGHTS_NAME}"
WEIGHTS_SHA256_PREFIX = "6726825d"
ENV_VAR = "FASTENC_FID_INCEPTION"
RESIZE = "299x299 bilinear (torch F.interpolate, align_corners=False, no antialias), [0, 1] -> [-1, 1]"
DIMS = 2048


class BasicConv2d(nn.Module):
    def __init__(self, cin: int, cout: int, **kwargs):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, bias=False, **kwargs)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def _avg3(x):  # the FID graph's 3x3 average pool leaves the padding out of the mean
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):
    def __init__(self, cin: int, pool_features: int):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch5x5_1 = BasicConv2d(cin, 48, kernel_size=1)
        self.branch5x5_2 = BasicConv2d(48, 64, kernel_size=5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, kernel_size=1)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)), dbl,
                          self.branch_pool(_avg3(x))], 1)


class InceptionB(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, kernel_size=3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, kernel_size=3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, kernel_size=3, stride=2)

    def forward(self, x):
        dbl = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), dbl, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionC(nn.Module):
    def __init__(self, cin: int, channels_7x7: int):
        super().__init__()
        c7 = channels_7x7
        self.branch1x1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7_2 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, kernel_size=1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([self.branch1x1(x), b7, dbl, self.branch_pool(_avg3(x))], 1)


class InceptionD(nn.Module):
    def __init__(self, cin: int):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch3x3_2 = BasicConv2d(192, 320, kernel_size=3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, kernel_size=1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, kernel_size=3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, kernel_size=3, stride=2)], 1)


class InceptionE(nn.Module):
    """``max_pool``: the last block (pytorch-fid's FIDInceptionE_2) pools its pool branch with a max."""

    def __init__(self, cin: int, max_pool: bool = False):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, kernel_size=1)
        self.branch3x3_1 = BasicConv2d(cin, 384, kernel_size=1)
        self.branch3x3_2a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, kernel_size=1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, kernel_size=3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, kernel_size=(1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, kernel_size=(3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, kernel_size=1)

    def forward(self, x):
        b3 = self.branch3x3_1(x)
        b3 = torch.cat([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], 1)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        dbl = torch.cat([self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl)], 1)
        pool = F.max_pool2d(x, kernel_size=3, stride=1, padding=1) if self.max_pool else _avg3(x)
        return torch.cat([self.branch1x1(x), b3, dbl, self.branch_pool(pool)], 1)


class FIDInceptionV3(nn.Module):
    """x: [N, 3, H, W] in [0, 1] -> [N, 2048] pool features."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, kernel_size=3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, kernel_size=3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, kernel_size=3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, kernel_size=1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, kernel_size=3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, channels_7x7=128)
        self.Mixed_6c = InceptionC(768, channels_7x7=160)
        self.Mixed_6d = InceptionC(768, channels_7x7=160)
        self.Mixed_6e = InceptionC(768, channels_7x7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280)
        self.Mixed_7c = InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)  # in the weights file; the features are taken before it

    def forward(self, x):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)  # [N, 3, 299, 299]
        x = 2 * x - 1
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, kernel_size=3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, kernel_size=3, stride=2)  # [N, 192, 35, 35]
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        return x.mean(dim=(2, 3))  # [N, 2048]


def _missing_weights(what: str) -> ConfigError:
    return ConfigError(f"{what}: FID needs pytorch-fid's Inception-v3 weights {WEIGHTS_NAME} (91 MB; download "
                       f"{WEIGHTS_URL} once, then pass --inception FILE or set ${ENV_VAR})")


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class InceptionExtractor:
    """``extractor(images [N, 3, H, W] float in [0, 1]) -> [N, 2048]`` float64 numpy."""

    dims = DIMS
    resize = RESIZE

    def __init__(self, weights: str | Path | None, *, device=None):
        from fastenc.api import default_device

        given = weights or os.environ.get(ENV_VAR)
        if not given:
            raise _missing_weights("no --inception given")
        path = Path(given).expanduser()
        flag = "--inception" if weights else f"${ENV_VAR}"
        if not path.is_file():
            raise _missing_weights(f"{flag} {path}: not a file")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a truncated or foreign file: pickle, zip and torch errors alike
            first = (str(exc).strip().splitlines() or [""])[0]  # torch's messages run over many lines
            raise ConfigError(f"{flag} {path}: not a torch weights file ({type(exc).__name__}: {first})") from None
        model = FIDInceptionV3()
        if not isinstance(state, dict):
            raise ConfigError(f"{flag} {path}: holds a {type(state).__name__}, not a state dict") from None
        state = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
        expected = {k: v.shape for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}
        missing = sorted(set(expected) - set(state))
        wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k]))
        if missing or wrong:
            what = [f"{len(missing)} tensors missing, e.g. {missing[0]!r}"] if missing else []
            what += [f"{len(wrong)} of other shapes, e.g. {wrong[0]!r}"] if wrong else []
            raise ConfigError(f"{flag} {path}: not the FID Inception-v3 ({'; '.join(what)}); expected {WEIGHTS_NAME} "
                              f"from {WEIGHTS_URL}")
        model.load_state_dict({k: state[k] for k in expected}, strict=False)
        self.device = default_device(device)
        self.model = model.eval().to(self.device)
        self.path = path
        self.sha256 = sha256_of(path)
        self.standard = self.sha256.startswith(WEIGHTS_SHA256_PREFIX)
        if not self.standard:
            log.warning("fid: %s is not %s (sha256 %s...): its FID is not comparable with published values",
                        path, WEIGHTS_NAME, self.sha256[:8])
        self.name = f"inception-v3-fid:{self.sha256[:16]}"

    @torch.no_grad()
    def __call__(self, images: torch.Tensor):
        return self.model(images.to(self.device, torch.float32)).double().cpu().numpy()

    def describe(self) -> dict:
        return {"name": "pytorch-fid Inception-v3 pool3", "weights": str(self.path), "sha256": self.sha256,
                "standard_weights": self.standard, "dims": self.dims, "resize": self.resize}
