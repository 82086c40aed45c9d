"""ResNext+: per-slice CNN with lung-mask fusion and CBAM, BiLSTM over slices, slice attention.

Figure 1 of the paper, read top to bottom:

    slice n (CT, mask) -> [7 x 7 conv on CT (pretrainable) + 7 x 7 conv on mask (untrained)]
        -> BN -> ReLU -> CBAM -> max-pool -> ResNeXt-50 stages -> global average pool  (2048-d)
    slices 1..S -> bidirectional LSTM (2 x 512) -> slice attention (softmax over slices)
        -> attention-weighted sum (1024-d) -> FC 1024 -> ReLU -> FC num_classes  (logits)
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from networks.cbam import CBAM
from networks.pretrained import load_pretrained
from networks.resnext import resnext50_32x4d
from networks.slice_attention import MeanSlicePooling, SliceAttention, SliceRule
from networks.temperature import TemperatureScaling

__all__ = ["ResNextPlus", "SliceEncoder"]

LSTM_INIT_STD = 0.1  # N(0, 0.01 variance), as the paper initialised its LSTM


class SliceEncoder(nn.Module):
    """The per-slice CNN of Figure 1 ("ResNext+"): one 2048-d feature vector per slice.

    The CT channel goes through the backbone's (pretrainable) stem convolution, the lung mask
    through its own convolution of the same shape (random, or a copy of the CT stem once
    pretrained weights are loaded: :meth:`init_mask_stem_from_ct_stem`); the two maps are summed, then
    batch-normalised, rectified and refined by CBAM before the max-pool and the ResNeXt stages.

    Args:
        use_mask: fuse the lung mask (input channel 1) into the stem.
        use_cbam: apply CBAM to the fused stem features.
        cbam_reduction: reduction ratio of CBAM's channel-attention MLP.
        spatial_kernel: kernel size of CBAM's spatial-attention convolution.

    Shape:
        ``(N, C, H, W) -> (N, 2048)`` with ``C = 2`` (CT, mask) or ``C = 1`` without the mask.
    """

    def __init__(
        self, use_mask: bool = True, use_cbam: bool = True, cbam_reduction: int = 16, spatial_kernel: int = 9
    ) -> None:
        super().__init__()
        self.backbone = resnext50_32x4d(in_channels=1)
        stem = self.backbone.conv1
        self.mask_conv: nn.Conv2d | None = None
        if use_mask:
            self.mask_conv = nn.Conv2d(
                1, stem.out_channels, stem.kernel_size, stride=stem.stride, padding=stem.padding, bias=False
            )
            nn.init.kaiming_normal_(self.mask_conv.weight, mode="fan_out", nonlinearity="relu")
        self.cbam: CBAM | None = CBAM(stem.out_channels, cbam_reduction, spatial_kernel) if use_cbam else None
        self.out_features = self.backbone.out_features

    @torch.no_grad()
    def init_mask_stem_from_ct_stem(self) -> None:
        """Start the mask convolution from the CT stem's kernels (after loading pretrained weights).

        A lung mask is a grey image too: the pretrained edge and blob detectors of the stem
        respond to the lung outline from the first step, where a random kernel would feed
        noise into the pretrained stages.
        """
        if self.mask_conv is not None:
            self.mask_conv.weight.copy_(self.backbone.conv1.weight)

    def forward(self, slices: Tensor) -> Tensor:
        stem = self.backbone.conv1
        if self.mask_conv is not None:
            # conv_ct(ct) + conv_mask(mask) is one convolution of both channels with the two
            # kernels stacked along the input channels: same sum, one pass over the slices.
            weight = torch.cat([stem.weight, self.mask_conv.weight], dim=1)
            features = F.conv2d(slices, weight, None, stem.stride, stem.padding)
        else:
            features = stem(slices)
        features = self.backbone.relu(self.backbone.bn1(features))
        if self.cbam is not None:
            features = self.cbam(features)
        return self.backbone.forward_stages(self.backbone.maxpool(features))


@contextlib.contextmanager
def _batch_norm_stats_kept(module: nn.Module) -> Iterator[None]:
    """Restore every batch-norm buffer of ``module`` on exit.

    Checkpointing runs a chunk's forward pass a second time during backward; in training
    mode that would update the running estimates twice. Wrapping the recomputation in this
    context keeps them exactly as after the first, regular forward pass.
    """
    saved = [
        (buffer, buffer.clone())
        for layer in module.modules()
        if isinstance(layer, nn.modules.batchnorm._BatchNorm)
        for buffer in layer.buffers()
    ]
    try:
        yield
    finally:
        with torch.no_grad():
            for buffer, value in saved:
                buffer.copy_(value)


class ResNextPlus(nn.Module):
    """ResNext+ (Mohammed et al., IEEE Access 2020): volume classification with slice attention.

    Args:
        num_classes: number of output logits (softmax belongs to the loss or post-processing).
        use_mask: fuse the lung mask (input channel 1); ``False`` expects one input channel.
        use_cbam: channel and spatial attention after the fusion stem (``False``: N-SCA).
        use_slice_attention: attention pooling over slices (``False``: N-SLA, the mean, whose
            reported attention is uniform).
        lstm_hidden: hidden size of each direction of the bidirectional LSTM.
        fc_hidden: hidden units of the classifier.
        cbam_reduction: reduction ratio of CBAM's channel MLP.
        spatial_kernel: kernel size of CBAM's spatial convolution.
        pretrained: local file with torchvision ``resnext50_32x4d`` ImageNet weights for the
            backbone (see :func:`~networks.pretrained.load_pretrained`), or ``None``. The mask
            convolution then starts as a copy of the (grey) CT stem.
        freeze_bn_stats: keep batch-norm running estimates fixed in training (the layers stay
            in eval mode; their affine weights still train). ``None``: frozen exactly when
            ``pretrained`` weights were loaded, since from scratch the initial estimates would
            leave the 50-layer network unnormalised.
        slice_chunk: run the CNN over at most this many slices at a time, which bounds the
            memory of inference over long volumes (results equal the unchunked ones). In
            training, batch-norm statistics (when not frozen) are then those of each chunk.
        attention_temperature: temperature of the slice attention's softmax (see
            :class:`~networks.slice_attention.SliceAttention`); 1 is the paper's.
        checkpoint_slices: in training, recompute each chunk's CNN activations during backward
            instead of storing them (same gradients, far less memory). Requires
            ``slice_chunk``. TorchScript ignores it.
        channels_last: keep the CNN's convolution weights and its slices in the channels-last
            memory format, which oneDNN (CPU) and cuDNN (GPU, mixed precision) convolve faster;
            the results are the same up to floating-point rounding.

    Shape:
        ``x``: ``(B, C, H, W, S)``, channel 0 the CT slices windowed to [0, 1], channel 1 the
        lung mask; ``S`` slices in axial order, any ``S >= 1``. The slices of all ``B`` volumes
        form the CNN's batch, so that in training batch-norm statistics span several volumes
        when ``B > 1`` (one volume's slices alone would partly normalise away what sets that
        volume apart from the others). Any dtype: a compact float16 input is cast to the
        weights' dtype one slice chunk at a time. Returns logits ``(B, num_classes)``.

    Attributes:
        slice_rule: the slice rule's ``tau`` and volume ``threshold``
            (:class:`~networks.slice_attention.SliceRule`), saved with the weights; training
            tunes them on validation data.
        calibration: the temperature that divides the logits in evaluation mode
            (:class:`~networks.temperature.TemperatureScaling`; 1 until training fits one on
            validation data), saved with the weights.
    """

    def __init__(
        self,
        num_classes: int = 2,
        use_mask: bool = True,
        use_cbam: bool = True,
        use_slice_attention: bool = True,
        lstm_hidden: int = 512,
        fc_hidden: int = 1024,
        cbam_reduction: int = 16,
        spatial_kernel: int = 9,
        pretrained: str | os.PathLike | None = None,
        freeze_bn_stats: bool | None = None,
        slice_chunk: int | None = None,
        checkpoint_slices: bool = False,
        attention_temperature: float = 1.0,
        channels_last: bool = False,
    ) -> None:
        super().__init__()
        if slice_chunk is not None and slice_chunk < 1:
            raise ValueError(f"slice_chunk must be a positive number of slices or None, got {slice_chunk}")
        if checkpoint_slices and slice_chunk is None:
            raise ValueError("checkpoint_slices needs slice_chunk: the number of slices recomputed at a time")
        self.in_channels = 2 if use_mask else 1
        self.slice_chunk = slice_chunk
        self.checkpoint_slices = checkpoint_slices
        self.channels_last = channels_last
        self.freeze_bn_stats = bool(pretrained is not None if freeze_bn_stats is None else freeze_bn_stats)

        self.encoder = SliceEncoder(use_mask, use_cbam, cbam_reduction, spatial_kernel)
        self.lstm = nn.LSTM(self.encoder.out_features, lstm_hidden, batch_first=True, bidirectional=True)
        for name, parameter in self.lstm.named_parameters():
            if name.startswith("weight"):
                nn.init.normal_(parameter, mean=0.0, std=LSTM_INIT_STD)
            else:
                nn.init.zeros_(parameter)
        slice_features = 2 * lstm_hidden
        self.slice_pooling: nn.Module = (
            SliceAttention(slice_features, temperature=attention_temperature)
            if use_slice_attention
            else MeanSlicePooling()
        )
        self.classifier = nn.Sequential(
            nn.Linear(slice_features, fc_hidden), nn.ReLU(inplace=True), nn.Linear(fc_hidden, num_classes)
        )
        self.slice_rule = SliceRule()
        self.calibration = TemperatureScaling()
        if pretrained is not None:
            load_pretrained(self.encoder.backbone, pretrained)
            self.encoder.init_mask_stem_from_ct_stem()
        if channels_last:
            self.encoder.to(memory_format=torch.channels_last)

    def train(self, mode: bool = True) -> ResNextPlus:
        """Set training mode; batch-norm layers stay in eval mode when their stats are frozen."""
        super().train(mode)
        if mode and self.freeze_bn_stats:
            for module in self.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    @torch.jit.unused
    def _encode_checkpointed(self, slices: Tensor) -> Tensor:
        return checkpoint(
            self.encoder,
            slices,
            use_reentrant=False,
            context_fn=lambda: (contextlib.nullcontext(), _batch_norm_stats_kept(self.encoder)),
        )

    def encode_slices(self, slices: Tensor) -> Tensor:
        """CNN features of a stack of slices, chunk by chunk when ``slice_chunk`` is set.

        Args:
            slices: ``(N, C, H, W)``.

        Returns:
            ``(N, 2048)``.
        """
        chunk = self.slice_chunk
        if chunk is None:
            return self.encoder(self.prepared_slices(slices))
        parts: list[Tensor] = []
        # split, not indexing: indexing a collated batch of MetaTensors along the batch
        # dimension makes MONAI look for per-item meta data, which the slices do not have.
        for part in slices.split(chunk):
            part = self.prepared_slices(part)
            if self.checkpoint_slices and self.training and not torch.jit.is_scripting():
                parts.append(self._encode_checkpointed(part))
            else:
                parts.append(self.encoder(part))
        return torch.cat(parts, dim=0)

    def prepared_slices(self, slices: Tensor) -> Tensor:
        """``(N, C, H, W)`` slices in the CNN's dtype and memory format (one copy at most)."""
        dtype = self.lstm.weight_ih_l0.dtype  # the model's parameter dtype, whatever its encoder
        if self.channels_last:
            return slices.to(dtype=dtype, memory_format=torch.channels_last)
        return slices.to(dtype=dtype).contiguous()

    @torch.jit.export
    def forward_with_attention(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits together with the slice attention.

        Args:
            x: ``(B, C, H, W, S)`` volumes.

        Returns:
            Logits ``(B, num_classes)`` and attention weights ``(B, S)`` (each row sums to 1;
            uniform without slice attention).
        """
        if x.dim() != 5 or x.shape[4] < 1:
            raise ValueError(f"expected input of shape (B, C, H, W, S) with S >= 1, got {list(x.shape)}")
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"expected {self.in_channels} input channels (CT, then lung mask when used), "
                f"got input of shape {list(x.shape)}"
            )
        batch, channels, height, width, depth = x.shape
        slices = x.permute(0, 4, 1, 2, 3).reshape(batch * depth, channels, height, width)
        return self.classify_slice_features(self.encode_slices(slices).reshape(batch, depth, -1))

    def classify_slice_features(self, features: Tensor) -> tuple[Tensor, Tensor]:
        """The part after the CNN: BiLSTM over the slices, slice pooling, classifier.

        Args:
            features: ``(B, S, 2048)`` CNN features of each volume's slices, in axial order.

        Returns:
            Logits ``(B, num_classes)`` and attention weights ``(B, S)``, in float32 also under
            autocast: the head is cheap, and the attention softmax and the volume probability
            would lose their small differences in bfloat16.
        """
        if not torch.jit.is_scripting():  # noqa: SIM102 (TorchScript skips only this exact guard)
            if torch.is_autocast_enabled(features.device.type):
                return self._classify_in_float32(features)
        return self._classify(features)

    @torch.jit.unused
    def _classify_in_float32(self, features: Tensor) -> tuple[Tensor, Tensor]:
        with torch.autocast(features.device.type, enabled=False):
            return self._classify(features.float())

    def _classify(self, features: Tensor) -> tuple[Tensor, Tensor]:
        slice_features, _ = self.lstm(features)
        pooled, attention = self.slice_pooling(slice_features)
        return self.calibration(self.classifier(pooled)), attention

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_with_attention(x)[0]
