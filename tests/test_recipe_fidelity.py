"""The finetuning recipes against the original's code, rule by rule: each test transcribes the
original's rule (mmseg, mmrotate, open-cd, the original's configs) and checks ours against it."""

import math

import jax
import numpy as np
from flax import nnx

from mtp_jax.models.heads.unet import UNetHead


def test_unet_head_initialises_only_conv_seg_normal_and_the_decoder_as_pytorch():
  """open-cd's UNetHead: BaseDecodeHead's init_cfg Normal(std=0.01, override conv_seg) (bias 0);
  the decoder's nn.Conv2d keep PyTorch's kaiming_uniform(a=sqrt(5)) = U(+-1/sqrt(fan_in)); the
  BatchNorms scale 1, bias 0. At the paper's widths (ViT-B maps, decoder 512/256/128/64)."""
  head = UNetHead((768,) * 4, {"levir_cd": 2}, rngs=nnx.Rngs(0))
  for i, block in enumerate(head.blocks):
    for conv_bn in (block.conv1, block.conv2):
      w = np.asarray(conv_bn.conv.kernel[...])
      bound = 1 / math.sqrt(w.shape[0] * w.shape[1] * w.shape[2])
      assert np.abs(w).max() <= bound and conv_bn.conv.bias is None, i
      assert abs(w.std() / (bound / math.sqrt(3)) - 1) < 0.03, (i, w.std(), bound)
      assert abs(w.mean()) < 0.03 * bound, i
      np.testing.assert_array_equal(np.asarray(conv_bn.bn.scale[...]), 1)
      np.testing.assert_array_equal(np.asarray(conv_bn.bn.bias[...]), 0)
  seg = head.conv_seg["levir_cd"]
  w = np.asarray(seg.kernel[...])
  assert w.shape == (1, 1, 64, 2) and 0.007 < w.std() < 0.013 and np.abs(w).max() < 0.05
  np.testing.assert_array_equal(np.asarray(seg.bias[...]), 0)
