"""The MTP pretraining framework in plain PyTorch (no mmcv / mmdet / mmseg): the official module
hierarchy, so `MTPFramework(...).state_dict()` has the keys and shapes of the official
`Iter_*_pretrn_model.pth` (MTP_SPEC §3.6) and an export of ours loads with `strict=True`.

    from mtp_jax.torch_twin.mtp_decoders import MTPFramework
    twin = MTPFramework.official("vit_b_rvsa", 448)         # SOTA / SIOR / FAST, ss + is + rd
    twin.load_state_dict(torch.load("model.pth"), strict=True)

Written from the sources (paths in ViTAE-Transformer/MTP, Multi-Task_Pretrain/):
- models.py `MutliTaskPretrnFramework.__init__`: encoder, semsegdecoder (MTP_SS_UperNet with an
  mmseg UPerHead, num_classes=1, channels 256, SyncBN), semseghead_{1,2,3} = Sequential(Dropout2d,
  Conv2d(256, C_ss, 1)), inssegdecoder (MTP_IS_MaskRCNN), inssegroiboxhead_fc_cls{k} /
  _fc_reg{k} / inssegroimaskhead_conv{k}, rotdetdecoder (MTP_RD_OrientedRCNN),
  rotdetroiboxhead_fc_cls{k} / _fc_reg{k}. All are built whatever `--tasks` says.
- semantic_segmentation/encoder_decoder.py: `decode_head` only (no backbone, neck, auxiliary).
  mmseg UPerHead: psp_modules (PPM: Sequential(AdaptiveAvgPool2d, ConvModule)), bottleneck,
  lateral_convs, fpn_convs, fpn_bottleneck, the BaseDecodeHead's conv_seg and dropout.
- instance_segmentation/{two_stage, mask_rcnn, rpn_head, roi_head, bbox_head, base_bbox_head,
  mask_head}.py: neck (mmdet FPN), rpn_head (rpn_conv, rpn_cls, rpn_reg), roi_head
  (bbox_roi_extractor, bbox_head = Shared2FC with shared_fcs only: fc_cls / fc_reg are commented
  out; mask_roi_extractor; mask_head = FCNMaskHead convs + upsample, conv_logits commented out).
- rotated_detection/{two_stage, oriented_rcnn, rpn_head, standard_roi_head, bbox_head,
  base_bbox_head}.py: the same with 6 RPN deltas and no mask branch.
- mmcv ConvModule: `conv` (bias only without norm) then `bn` (SyncBN in MTP; BatchNorm2d here has
  the same state) and ReLU; SyncBN's `num_batches_tracked` is part of the state.
Forward passes are the inference ones, for numerical checks; RoI extraction and losses are not
modelled (they hold no state).
"""

import torch
import torch.nn.functional as F
from torch import nn


class ConvModule(nn.Module):
  """mmcv ConvModule: conv (bias iff no norm) -> optional BatchNorm `bn` -> optional ReLU."""

  def __init__(self, cin, cout, k, *, norm=False, act=True):
    super().__init__()
    self.conv = nn.Conv2d(cin, cout, k, padding=k // 2, bias=not norm)
    if norm:
      self.bn = nn.BatchNorm2d(cout)
    self.act = act

  def forward(self, x):
    x = self.conv(x)
    if hasattr(self, "bn"):
      x = self.bn(x)
    return F.relu(x) if self.act else x


class UPerHead(nn.Module):
  """mmseg UPerHead (BaseDecodeHead with num_classes=1, as MTP builds it)."""

  def __init__(self, in_channels, channels=256, pool_scales=(1, 2, 3, 6), num_classes=1):
    super().__init__()
    self.psp_modules = nn.ModuleList([
        nn.Sequential(nn.AdaptiveAvgPool2d(s), ConvModule(in_channels[-1], channels, 1, norm=True))
        for s in pool_scales])
    self.bottleneck = ConvModule(in_channels[-1] + len(pool_scales) * channels, channels, 3, norm=True)
    self.lateral_convs = nn.ModuleList([ConvModule(c, channels, 1, norm=True) for c in in_channels[:-1]])
    self.fpn_convs = nn.ModuleList([ConvModule(channels, channels, 3, norm=True) for _ in in_channels[:-1]])
    self.fpn_bottleneck = ConvModule(len(in_channels) * channels, channels, 3, norm=True)
    self.conv_seg = nn.Conv2d(channels, num_classes, 1)   # unused by MTP
    self.dropout = nn.Dropout2d(0.1)

  @staticmethod
  def _up(x, size):
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)

  def _forward_feature(self, inputs):
    """What MTP calls: 4 NCHW maps -> (B, channels, H/4, W/4)."""
    x = inputs[-1]
    psp = [x] + [self._up(m(x), x.shape[2:]) for m in self.psp_modules]
    laterals = [conv(inputs[i]) for i, conv in enumerate(self.lateral_convs)]
    laterals.append(self.bottleneck(torch.cat(psp, 1)))
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + self._up(laterals[i], laterals[i - 1].shape[2:])
    outs = [self.fpn_convs[i](laterals[i]) for i in range(len(laterals) - 1)] + [laterals[-1]]
    outs = [outs[0]] + [self._up(o, outs[0].shape[2:]) for o in outs[1:]]
    return self.fpn_bottleneck(torch.cat(outs, 1))


class SemSegDecoder(nn.Module):
  """MTP_SS_UperNet: only `decode_head`."""

  def __init__(self, in_channels, channels=256):
    super().__init__()
    self.decode_head = UPerHead(in_channels, channels)


class FPN(nn.Module):
  """mmdet FPN (no norm, no activation, nearest top-down, max-pool extra levels)."""

  def __init__(self, in_channels, out_channels=256, num_outs=5):
    super().__init__()
    self.num_outs = num_outs
    self.lateral_convs = nn.ModuleList([ConvModule(c, out_channels, 1, act=False) for c in in_channels])
    self.fpn_convs = nn.ModuleList([ConvModule(out_channels, out_channels, 3, act=False) for _ in in_channels])

  def forward(self, inputs):
    laterals = [conv(x) for conv, x in zip(self.lateral_convs, inputs)]
    for i in range(len(laterals) - 1, 0, -1):
      laterals[i - 1] = laterals[i - 1] + F.interpolate(laterals[i], size=laterals[i - 1].shape[2:],
                                                        mode="nearest")
    outs = [conv(x) for conv, x in zip(self.fpn_convs, laterals)]
    while len(outs) < self.num_outs:
      outs.append(F.max_pool2d(outs[-1], 1, stride=2))
    return outs


class RPNHead(nn.Module):
  def __init__(self, channels=256, num_anchors=3, reg_dim=4):
    super().__init__()
    self.rpn_conv = nn.Conv2d(channels, channels, 3, padding=1)
    self.rpn_cls = nn.Conv2d(channels, num_anchors, 1)        # sigmoid: 1 class per anchor
    self.rpn_reg = nn.Conv2d(channels, num_anchors * reg_dim, 1)

  def forward_single(self, x):
    x = F.relu(self.rpn_conv(x))
    return self.rpn_cls(x), self.rpn_reg(x)


class Shared2FCBBoxHead(nn.Module):
  """MTP_{IS,RD}_Shared2FCBBoxHead: shared_fcs only (the other branches are empty ModuleLists)."""

  def __init__(self, in_channels=256, roi_feat_size=7, fc_out_channels=1024):
    super().__init__()
    self.shared_convs = nn.ModuleList()
    self.shared_fcs = nn.ModuleList([nn.Linear(in_channels * roi_feat_size ** 2, fc_out_channels),
                                     nn.Linear(fc_out_channels, fc_out_channels)])
    self.cls_convs, self.cls_fcs = nn.ModuleList(), nn.ModuleList()
    self.reg_convs, self.reg_fcs = nn.ModuleList(), nn.ModuleList()

  def forward(self, x):
    x = x.flatten(1)
    for fc in self.shared_fcs:
      x = F.relu(fc(x))
    return x, x


class FCNMaskHead(nn.Module):
  """MTP_IS_FCNMaskHead: 4 ConvModules (3x3 + ReLU), upsample ConvTranspose2d(2, 2) + ReLU."""

  def __init__(self, in_channels=256, conv_out_channels=256, num_convs=4):
    super().__init__()
    dims = [in_channels] + [conv_out_channels] * num_convs
    self.convs = nn.ModuleList([ConvModule(dims[i], dims[i + 1], 3) for i in range(num_convs)])
    self.upsample = nn.ConvTranspose2d(dims[-1], conv_out_channels, 2, stride=2)

  def forward(self, x):
    for conv in self.convs:
      x = conv(x)
    return F.relu(self.upsample(x))


class RoIExtractor(nn.Module):
  """(Rotated)SingleRoIExtractor: RoIAlign layers without parameters or buffers."""


class RoIHead(nn.Module):
  def __init__(self, channels=256, fc_channels=1024, mask=False):
    super().__init__()
    self.bbox_roi_extractor = RoIExtractor()
    self.bbox_head = Shared2FCBBoxHead(channels, 7, fc_channels)
    if mask:
      self.mask_roi_extractor = RoIExtractor()
      self.mask_head = FCNMaskHead(channels, channels)


class TwoStage(nn.Module):
  """MTP_IS_MaskRCNN (mask=True, 4 deltas) / MTP_RD_OrientedRCNN (6 deltas), without backbone."""

  def __init__(self, in_channels, *, channels=256, fc_channels=1024, reg_dim=4, mask=False):
    super().__init__()
    self.neck = FPN(in_channels, channels, 5)
    self.rpn_head = RPNHead(channels, 3, reg_dim)
    self.roi_head = RoIHead(channels, fc_channels, mask)


class MTPFramework(nn.Module):
  """MutliTaskPretrnFramework's modules in its registration order (= the state_dict order).

  ss_classes: per-subset SS outputs (with background), e.g. [19, 21, 38]; det_classes: per-subset
  object classes, e.g. [18, 20, 37]. `tasks` builds only some decoders (the official builds all
  three; fewer matches an export of a run with fewer tasks). `encoder`: a module (the official
  uses `mtp_jax.torch_twin.vit_rvsa`) or None for the decoders alone.
  """

  def __init__(self, encoder, in_channels, ss_classes, det_classes, *, tasks=("ss", "is", "rd"),
               channels=256, fc_channels=1024, mask_channels=None):
    super().__init__()
    if encoder is not None:
      self.encoder = encoder
    in_channels = list(in_channels)
    if "ss" in tasks:
      self.semsegdecoder = SemSegDecoder(in_channels, channels)
      for k, c in enumerate(ss_classes, 1):
        self.add_module(f"semseghead_{k}", nn.Sequential(nn.Dropout2d(0.1), nn.Conv2d(channels, c, 1)))
    if "is" in tasks:
      self.inssegdecoder = TwoStage(in_channels, channels=channels, fc_channels=fc_channels,
                                    reg_dim=4, mask=True)
      for k, c in enumerate(det_classes, 1):
        self.add_module(f"inssegroiboxhead_fc_cls{k}", nn.Linear(fc_channels, c + 1))
      for k, c in enumerate(det_classes, 1):
        self.add_module(f"inssegroiboxhead_fc_reg{k}", nn.Linear(fc_channels, 4 * c))
      for k, c in enumerate(det_classes, 1):
        self.add_module(f"inssegroimaskhead_conv{k}", nn.Conv2d(channels, c, 1))
    if "rd" in tasks:
      self.rotdetdecoder = TwoStage(in_channels, channels=channels, fc_channels=fc_channels,
                                    reg_dim=6, mask=False)
      for k, c in enumerate(det_classes, 1):
        self.add_module(f"rotdetroiboxhead_fc_cls{k}", nn.Linear(fc_channels, c + 1))
      for k, c in enumerate(det_classes, 1):
        self.add_module(f"rotdetroiboxhead_fc_reg{k}", nn.Linear(fc_channels, 5))

  @classmethod
  def official(cls, encoder: str = "vit_b_rvsa", img_size: int = 448, classes=(18, 20, 37)):
    """The released configuration: SOTA 18 / SIOR 20 / FAST 37 classes, ss + is + rd."""
    from mtp_jax.torch_twin.vit_rvsa import build_twin
    enc = build_twin(encoder, img_size)
    dim = enc.pos_embed.shape[-1]
    return cls(enc, [dim] * 4, [c + 1 for c in classes], list(classes)).eval()
