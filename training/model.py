"""PtychoNN-style network: one convolutional encoder, two decoders (amplitude, phase).

Why this and not a ViT: the mapping is from one far-field pattern to a small
real-space patch, which PtychoNN (Cherukara et al., Appl. Phys. Lett. 117,
044103, 2020) showed a plain encoder-decoder CNN learns from modest simulated
data; convolutions are what TensorRT and ONNX Runtime run fastest at small
batch, the model stays ~1 M parameters (a few MB), and it trains within
minutes. A ViT needs far more data and time to beat it at this size.

The graph takes the measured amplitudes sqrt(counts), (B, 1, n, n), zero
frequency at the centre, and normalises them itself (unit mean power, then
log1p), so whoever runs it feeds the detector crop as the solver sees it.
Four 2x poolings take 128 to 8 px, which lets every output pixel see the whole
pattern; three 2x upsamplings give the central n/2 crop of the object window.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import nn


def _block(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1, inplace=True),
        nn.Conv2d(c_out, c_out, 3, padding=1),
        nn.BatchNorm2d(c_out),
        nn.LeakyReLU(0.1, inplace=True),
    )


class _Decoder(nn.Module):
    def __init__(self, channels: tuple[int, ...]) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in itertools.pairwise(channels):
            layers += [_block(c_in, c_out), nn.Upsample(scale_factor=2, mode="bilinear")]
        last = channels[-1] // 2
        layers += [_block(channels[-1], last), nn.Conv2d(last, 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class PtychoNNLite(nn.Module):
    """Diffraction amplitude (B, 1, n, n) -> object amplitude and phase (B, 1, n/2, n/2)."""

    def __init__(self, width: int = 16, log_gain: float = 16.0) -> None:
        super().__init__()
        c = (width, 2 * width, 4 * width, 8 * width)
        self.log_gain = log_gain
        self.encoder = nn.Sequential(
            _block(1, c[0]),
            nn.MaxPool2d(2),
            _block(c[0], c[1]),
            nn.MaxPool2d(2),
            _block(c[1], c[2]),
            nn.MaxPool2d(2),
            _block(c[2], c[3]),
            nn.MaxPool2d(2),
            _block(c[3], c[3]),
        )
        self.amplitude = _Decoder((c[3], c[3], c[2], c[1]))
        self.phase = _Decoder((c[3], c[3], c[2], c[1]))

    def normalise(self, amplitude: torch.Tensor) -> torch.Tensor:
        power = amplitude.square().mean(dim=(-2, -1), keepdim=True)
        x = amplitude * torch.rsqrt(power + 1e-12)
        return torch.log1p(self.log_gain * x) / math.log1p(self.log_gain)

    def forward(self, amplitude: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(self.normalise(amplitude))
        amp = nn.functional.softplus(self.amplitude(z))
        phase = math.pi * torch.tanh(self.phase(z))
        return amp, phase
