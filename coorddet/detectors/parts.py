"""Parts every detector family shares: the backbone network and the image transform."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from coorddet.backbones import build_backbone
from coorddet.detectors.options import ImageOptions


class GrayscaleTransform(GeneralizedRCNNTransform):
    """torchvision's transform, plus: images are brought to ``len(image_mean)`` channels before
    normalising. A 1-channel image is replicated (gray data into a 3-channel backbone, as
    Pillow's ``L`` -> ``RGB``); a 3-channel image into a 1-channel model becomes gray by
    torchvision's ``rgb_to_grayscale`` (ITU-R 601-2 luma). Other channel counts raise
    ``ValueError``.
    """

    def normalize(self, image: Tensor) -> Tensor:
        if not image.is_floating_point():
            raise TypeError(f"expected float images in [0, 1], got {image.dtype}")
        channels = len(self.image_mean)
        if image.shape[0] == 1 and channels > 1:
            image = image.expand(channels, -1, -1)
        elif image.shape[0] == 3 and channels == 1:
            red, green, blue = image.unbind(0)  # torchvision's rgb_to_grayscale, scriptable
            image = (red * 0.2989).add_(green, alpha=0.587).add_(blue, alpha=0.114).unsqueeze(0)
        elif image.shape[0] != channels:
            raise ValueError(f"expected images with 1 or 3 channels, got {image.shape}")
        mean = torch.as_tensor(self.image_mean, dtype=image.dtype, device=image.device)
        std = torch.as_tensor(self.image_std, dtype=image.dtype, device=image.device)
        return (image - mean[:, None, None]) / std[:, None, None]


class KeepSizeTransform(GrayscaleTransform):
    """:class:`GrayscaleTransform` that never resizes: images reach the backbone at their own
    size and a batch of mixed sizes is zero-padded (``model.keep_image_size``)."""

    def resize(
        self, image: Tensor, target: dict[str, Tensor] | None = None
    ) -> tuple[Tensor, dict[str, Tensor] | None]:
        return image, target


def backbone(image: ImageOptions) -> nn.Module:
    """The backbone network ``image.backbone``, with ``out_channels``; ``ValueError`` for
    ``pretrained=True`` without the weights file in the local cache (nothing downloads)."""
    return build_backbone(
        image.backbone,
        pretrained=image.pretrained,
        padding=image.backbone_padding,
        init=image.backbone_init,
        in_channels=image.channels,
    )


def transform(image: ImageOptions) -> GrayscaleTransform:
    """Resizing (torchvision's ``min_size``/``max_size``; none with ``keep_image_size``),
    channels and normalisation."""
    min_size, max_size = image.sizes
    mean, std = image.normalisation
    kind = KeepSizeTransform if image.keep_image_size else GrayscaleTransform
    return kind(min_size, max_size, mean, std)
