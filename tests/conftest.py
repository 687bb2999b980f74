"""Shared test setup: import the project from the repository root, one torch thread, the tiny model's
configuration, the reference vectors."""

import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
torch.set_num_threads(1)  # tiny models run fastest on one thread; the CI has two cores

# A CAV-MAE small enough for unit tests on a CPU: CAVMAEConfig(**TINY) has 8 x 4 audio tokens (128 mel
# bins, 64 frames) and 2 x 2 visual tokens (32 x 32 images) of width 32; the decoder is 16 wide.
TINY = dict(
    img_size=32,
    audio_length=64,
    embed_dim=32,
    num_heads=2,
    modality_specific_depth=1,
    decoder_embed_dim=16,
    decoder_depth=1,
    decoder_num_heads=2,
)

# Outputs of the official CAV-MAE code, torchaudio, torchvision and scikit-learn on small inputs
# (tests/golden/README.md says what each file holds). GOLDEN=<folder> runs the same tests on another set
# of the same layout, for example a larger one.
GOLDEN = os.environ.get("GOLDEN") or os.path.join(ROOT, "tests", "golden")

# The float32 FFT rounds differently on different CPUs. Measured between two machines, torchaudio's own
# log-mel values move by up to 5.5e-3 on bins 40 dB or more below their frame's peak and by under 3e-4 on
# the louder bins, so the fbank is compared bin class by bin class, with tolerances that hold on any CPU.
FBANK_QUIET_DB = 40.0
FBANK_TOL_LOUD = 1e-3
FBANK_TOL_QUIET = 1e-2


@pytest.fixture
def golden():
    """Path of the reference vectors; they ship with the project, so a missing folder is a failure."""
    assert os.path.isdir(GOLDEN), f"reference vectors not found at {GOLDEN}"
    return GOLDEN


def fbank_differences(got, want, scale=1.0):
    """(largest difference on the bins within 40 dB of their frame's peak, largest on the quieter bins).
    The log-mel is ln(power), so 40 dB is 4 ln(10); scale: 1 / std for fbanks normalised by std."""
    got, want = got.double(), want.double()
    assert got.shape == want.shape
    difference = (got - want).abs()
    threshold = want.max(dim=-1, keepdim=True).values - scale * FBANK_QUIET_DB / 10 * math.log(10)
    quiet = want < threshold
    loud_max = difference[~quiet].max().item()
    quiet_max = difference[quiet].max().item() if quiet.any() else 0.0
    return loud_max, quiet_max


def assert_fbank_close(got, want, scale=1.0, name=""):
    loud_max, quiet_max = fbank_differences(got, want, scale)
    assert loud_max <= FBANK_TOL_LOUD, f"{name}: loud bins differ by {loud_max:.3g}"
    assert quiet_max <= FBANK_TOL_QUIET, f"{name}: quiet bins differ by {quiet_max:.3g}"
