"""GPU sanity check (run on a CUDA machine): spectrum and FastClip on CUDA agree with the CPU ground truth.

python experiments/gpu_check.py
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from lightning_specclip import clip_spectral_norm_, spectrum
from lightning_specclip.spectral.exact import lanczos_singular_values


def main() -> None:
    """Print relative errors of spectrum() and clip_spectral_norm_() on CUDA against float64 CPU ARPACK."""
    torch.manual_seed(0)
    cases = {
        "conv2d zeros 64ch 32x32": (nn.Conv2d(64, 64, 3, padding=1), (64, 32, 32)),
        "conv2d circular stride 2": (nn.Conv2d(32, 64, 3, padding=1, stride=2, padding_mode="circular"), (32, 32, 32)),
        "conv+bn bf16": (nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)), (16, 16, 16)),
    }
    for name, (module, shape) in cases.items():
        if "bf16" in name:
            module = module.to(torch.bfloat16)

        def truth_of(m: nn.Module, shape: tuple[int, ...] = shape) -> float:
            return lanczos_singular_values(copy.deepcopy(m).float().cpu(), shape, k=1, tol=1e-10).values[0].item()

        truth = truth_of(module)
        module = module.cuda()
        s = spectrum(module, shape)
        target = 0.5 * truth
        result = clip_spectral_norm_(module, target, shape)
        after = truth_of(module)
        print(
            f"{name}: spectrum rel err {abs(s.sigma / truth - 1):.2e} (device {s.values.device}); "
            f"clip to {target:.4f}: after {after:.4f} ({after / target - 1:+.2%}), rounds {result.rounds}"
        )


if __name__ == "__main__":
    main()
