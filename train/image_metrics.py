"""Per-image reconstruction metrics: PSNR, MSE, L1 and SSIM, each with its convention stated.

    python -m train eval RUN_DIR                          # SSIM: [0, 1], data_range 1 (taming / LDM tables)
    python -m train eval RUN_DIR --ssim-data-range 2      # SSIM as LlamaGen's tokenizer evaluation computes it

Every metric compares the input crop with the model's reconstruction of it, both mapped
from [-1, 1] to [0, 1]; reconstructions are clamped to [-1, 1] first (as when saved as an
image) and kept in float (not quantised to 8 bits).

* ``psnr``: ``10 log10(1 / MSE_i)`` per image on the [0, 1] scale (peak 1), then averaged;
* ``mse``, ``l1``: mean squared / absolute pixel error per image on the [0, 1] scale;
* ``ssim`` (Wang et al. 2004, "Image quality assessment: from error visibility to structural
  similarity"), from maintained implementations, never our own:

  - ``--ssim-data-range 1`` (default): torchmetrics'
    ``structural_similarity_index_measure`` on [0, 1] images, ``data_range=1``, Gaussian
    window 11x11 with sigma 1.5, K1 0.01, K2 0.03, channels averaged: the original paper's
    settings, as the SSIM columns of LDM / taming-style tables use them;
  - ``--ssim-data-range 2``: LlamaGen's convention (``tokenizer/validation/val_ddp.py``):
    scikit-image's ``structural_similarity(rec, gt, data_range=2.0, channel_axis=-1)`` on
    [0, 1] images (LlamaGen keeps the images in [0, 1] and declares a range of 2), which
    is scikit-image's default 7x7 uniform window with the sample covariance.  Its values
    are higher than the default's for the same images.
"""
from __future__ import annotations

from typing import Dict

import torch

SSIM_DATA_RANGES = (1, 2)


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] or float [-1, 1] images -> float32 in [0, 1] (floats clamped first)."""
    if images.dtype == torch.uint8:
        return images.float() / 255.0
    return (images.float().clamp(-1, 1) + 1) / 2


def pixel_errors(x: torch.Tensor, y: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Per-image ``psnr``, ``mse`` and ``l1`` of ``x`` against ``y`` (uint8 or [-1, 1]), on the
    [0, 1] scale."""
    diff = to_unit(x) - to_unit(y)
    mse = diff.pow(2).flatten(1).mean(1)
    return {"psnr": 10 * torch.log10(1.0 / mse.clamp_min(1e-10)), "mse": mse,
            "l1": diff.abs().flatten(1).mean(1)}


def ssim(reference: torch.Tensor, reconstruction: torch.Tensor, data_range: int = 1) -> torch.Tensor:
    """Per-image SSIM (float64, on the CPU) in the convention ``data_range`` names (module docstring)."""
    ref, rec = to_unit(reference), to_unit(reconstruction)
    if data_range == 1:
        from torchmetrics.functional.image import structural_similarity_index_measure

        values = structural_similarity_index_measure(rec, ref, gaussian_kernel=True, sigma=1.5, kernel_size=11,
                                                     reduction="none", data_range=1.0, k1=0.01, k2=0.03)
        return values.detach().double().cpu().reshape(-1)
    if data_range == 2:
        from skimage.metrics import structural_similarity

        ref_np = ref.permute(0, 2, 3, 1).cpu().numpy()
        rec_np = rec.permute(0, 2, 3, 1).cpu().numpy()
        return torch.tensor([structural_similarity(b, a, data_range=2.0, channel_axis=-1)
                             for a, b in zip(ref_np, rec_np)], dtype=torch.float64)
    raise ValueError(f"SSIM data range {data_range!r}; valid: {', '.join(map(str, SSIM_DATA_RANGES))}")


def ssim_convention(data_range: int) -> Dict[str, object]:
    """What defines the SSIM figure (for the report)."""
    if data_range == 1:
        import torchmetrics

        return {"data_range": 1, "images": "[0, 1]", "window": "gaussian 11x11, sigma 1.5", "k1": 0.01, "k2": 0.03,
                "implementation": f"torchmetrics {torchmetrics.__version__} structural_similarity_index_measure",
                "convention": "taming / LDM tables (Wang et al. 2004 settings)"}
    import skimage

    return {"data_range": 2, "images": "[0, 1]", "window": "uniform 7x7, sample covariance", "k1": 0.01, "k2": 0.03,
            "implementation": f"scikit-image {skimage.__version__} structural_similarity",
            "convention": "LlamaGen (tokenizer/validation/val_ddp.py: data_range=2.0 on [0, 1] images)"}


__all__ = ["SSIM_DATA_RANGES", "to_unit", "pixel_errors", "ssim", "ssim_convention"]
