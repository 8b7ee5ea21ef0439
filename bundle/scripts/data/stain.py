"""H&E stain augmentation: random changes of the haematoxylin, eosin and DAB amounts of an image.

The "HED" colour augmentation of Tellez et al. (IEEE TMI 2018; "HED-light" in Tellez et al., Medical Image
Analysis 2019): the RGB image is unmixed into stain concentrations with the Ruifrok-Johnston H&E-DAB matrix
(``skimage.color``'s ``hed_from_rgb``), each concentration is scaled by ``1 + a`` and shifted by ``b`` with ``a``,
``b`` drawn uniformly from ``[-sigma, sigma]`` and ``[-bias, bias]`` per stain, and the result is mixed back.
MONAI has stain normalisation (``monai.apps.pathology.transforms``), not this augmentation. It makes a model less
sensitive to the staining of one lab, the variation between the training images and a new site's.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.transforms import MapTransform, RandomizableTransform
from monai.utils import TransformBackends, convert_to_dst_type
from skimage.color.colorconv import hed_from_rgb, rgb_from_hed


def jitter_stains(image: np.ndarray, scale: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """(3, H, W) RGB in [0, 255] -> the same with stain concentrations ``c * scale + shift`` (3 values each, in
    haematoxylin, eosin, DAB order; concentrations in optical density units, natural log); float32, clipped to
    [0, 255].

    Optical density ``-ln((I + 1) / 256)`` per channel, unmixed and mixed back with the Ruifrok-Johnston matrices
    of ``skimage.color`` (``hed_from_rgb``, ``rgb_from_hed``) but without ``rgb2hed``'s clipping of negative
    concentrations, so that an unchanged stain gives back the same image.
    """
    rgb = np.moveaxis(np.asarray(image, dtype=np.float64), 0, -1)
    density = -np.log((np.clip(rgb, 0.0, 255.0) + 1.0) / 256.0)
    stains = density @ hed_from_rgb
    jittered = np.exp(-((stains * scale + shift) @ rgb_from_hed)) * 256.0 - 1.0
    return np.clip(np.moveaxis(jittered, -1, 0), 0.0, 255.0).astype(np.float32)


class RandHEStaind(RandomizableTransform, MapTransform):
    """Random H&E stain jitter of channel-first RGB images in [0, 255] (see the module docstring).

    Args:
        keys: the image keys.
        prob: probability of jittering a sample.
        sigma: the largest relative change of each stain amount (0.05: "HED light").
        bias: the largest additive change of each stain's concentration (optical density, natural log).
    """

    backend = [TransformBackends.NUMPY]

    def __init__(self, keys: Sequence[str] | str = "image", prob: float = 0.5, sigma: float = 0.05,
                 bias: float = 0.05) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        if sigma < 0 or bias < 0:
            raise ValueError(f"RandHEStaind: sigma and bias must be >= 0, got sigma={sigma}, bias={bias}")
        self.sigma = sigma
        self.bias = bias
        self._scale = np.ones(3)
        self._shift = np.zeros(3)

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._scale = 1.0 + self.R.uniform(-self.sigma, self.sigma, size=3)
        self._shift = self.R.uniform(-self.bias, self.bias, size=3)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            image = d[key]
            jittered = jitter_stains(image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else image,
                                     self._scale, self._shift)
            d[key] = convert_to_dst_type(jittered, dst=image)[0]  # the input's type (MetaTensor too) and dtype
        return d
