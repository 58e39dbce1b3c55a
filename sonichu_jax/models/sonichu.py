"""SONICHU-124M: a ViT-B/16 backbone shared by one ViTPose classic head per biometry task.

An image batch and a task name go in; (B, K, 2) normalised keypoints (x, y) in (0, 1) come out. The
task is a static Python string, so under `jit` each task compiles its own program with only its
head: running all nine heads on every image would cost 75 % more compute (the backbone is about
23.1 GMAC per image, a head about 1.9).

Parameter count with the defaults (docs/sonichu.md, section "Architecture"): backbone 85,843,200
(including the stored 256 x 768 position table), each head 4,195,328 + 257 K, the nine heads (K sum
60) 37,773,372; 123,616,572 in all, the "124M" of the name. BatchNorm buffers add 1,024 scalars per
head.

Flip test-time augmentation (the ViTPose flip test with soft-argmax; see docs/sonichu.md, section
"Flip test-time augmentation"): the image and its horizontal mirror go through the network; the
mirror's keypoints are mapped back (x -> 1 - x, then the task's flip pairs swapped) and the two
coordinate sets are averaged. Averaging coordinates equals averaging the two softmax probability
maps, since soft-argmax is linear in them.
"""
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from sonichu_jax import tasks as tasks_lib
from sonichu_jax.models.heads import soft_argmax
from sonichu_jax.models.heads import ViTPoseHead
from sonichu_jax.models.vit import VisionTransformer
from ultrasound_common import batch_norm


class SonichuModel(nn.Module):
  """Backbone + one head per task. Defaults are SONICHU-124M.

  Variables: `backbone/...` (timm names, see vit.py) and `heads_{task}/...` (mmpose names, see
  heads.py) in 'params', the heads' BatchNorm statistics in 'batch_stats'.

  Attributes:
    tasks: task names (see sonichu_jax/tasks.py) that get a head.
    patch_size, embed_dim, depth, num_heads, mlp_ratio, patch_padding, drop_path_rate: the
      backbone's (see VisionTransformer).
    head_filters: channels of the heads' deconvolutions.
    temperature: soft-argmax temperature (SONICHU's value is unpublished; 1 is the
      integral-regression standard for a model trained on coordinates).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    attention_implementation: the backbone's attention, 'einsum' (default), 'xla' or 'cudnn'
      (ultrasound_common/attention.py).
    deconv_implementation: the heads' deconvolutions, 'subpixel' (default) or 'transposed'
      (heads.py).
    fold_batch_norm: inference with variables from `fold_batch_norm` (the heads' BatchNorm folded
      into their deconvolutions).
  """
  tasks: Sequence[str] = tasks_lib.TASK_NAMES
  patch_size: int = 16
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  patch_padding: int = 0
  drop_path_rate: float = 0.0
  head_filters: int = 256
  temperature: float = 1.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_implementation: str = 'einsum'
  deconv_implementation: str = 'subpixel'
  fold_batch_norm: bool = False

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.backbone = VisionTransformer(
        patch_size=self.patch_size, embed_dim=self.embed_dim, depth=self.depth,
        num_heads=self.num_heads, mlp_ratio=self.mlp_ratio, patch_padding=self.patch_padding,
        drop_path_rate=self.drop_path_rate,
        attention_implementation=self.attention_implementation, **kw)
    # A dict of submodules: Flax names them heads_{task}.
    self.heads = {name: ViTPoseHead(tasks_lib.get_task(name).num_keypoints, self.head_filters,
                                    deconv_implementation=self.deconv_implementation,
                                    fold_batch_norm=self.fold_batch_norm, **kw)
                  for name in self.tasks}

  def _head(self, task: str) -> ViTPoseHead:
    tasks_lib.get_task(task)  # An unknown name is a ValueError listing the valid ones.
    if task not in self.heads:
      raise ValueError(f'SonichuModel: task {task!r} has no head in this model; its tasks are '
                       f'{", ".join(self.tasks)}')
    return self.heads[task]

  def heatmaps(self, images: jax.Array, task: str, *, train: bool = False) -> jax.Array:
    """(B, H, W, 3) normalised images -> (B, H/4, W/4, K) heatmap logits of `task`'s head."""
    head = self._head(task)
    return head(self.backbone(images, train=train), train=train)

  def __call__(self, images: jax.Array, task: str, *, train: bool = False,
               tta: bool = False) -> jax.Array:
    """Predicts (B, K, 2) normalised keypoints (x, y) of `task` for (B, H, W, 3) normalised images.

    Args:
      images: preprocessed images (sonichu_jax/preprocess.py), channels-last.
      task: a task name of `self.tasks`; static (a Python string).
      train: batch statistics and stochastic depth; training batches must hold one task only, or the
        head's BatchNorm statistics mix tasks.
      tta: average with the prediction on the mirrored image (inference only).
    """
    if not tta:
      return soft_argmax(self.heatmaps(images, task, train=train), self.temperature)
    if train:
      raise ValueError('SonichuModel: flip TTA is for inference; call with train=False')
    # One batch of 2B (BatchNorm uses running statistics, so this equals two passes).
    both = jnp.concatenate([images, images[:, :, ::-1]], axis=0)
    coords = soft_argmax(self.heatmaps(both, task), self.temperature)
    direct, mirrored = jnp.split(coords, 2, axis=0)
    return 0.5 * (direct + unflip_keypoints(mirrored, tasks_lib.get_task(task)))

  def all_tasks(self, images: jax.Array) -> dict[str, jax.Array]:
    """Keypoints of every head, {task: (B, K, 2)}; with `init`, creates all heads' variables."""
    features = self.backbone(images)
    return {name: soft_argmax(head(features), self.temperature)
            for name, head in self.heads.items()}


def unflip_keypoints(coords: jax.Array, task: tasks_lib.Task) -> jax.Array:
  """Maps (..., K, 2) normalised keypoints predicted on a mirrored image back to the original image.

  x becomes 1 - x (exact with pixel-centre soft-argmax), and the keypoints of each flip pair swap.
  The map is its own inverse, so it also mirrors keypoints of an original image.
  """
  perm = jnp.asarray(task.flip_permutation())
  x, y = coords[..., 0], coords[..., 1]
  return jnp.stack([1.0 - x, y], axis=-1)[..., perm, :]


def fold_batch_norm(variables: Any) -> dict[str, Any]:
  """`variables` for the same model with `fold_batch_norm=True` (inference only).

  Each head's BatchNorm is folded into the deconvolution before it, whose (kh, kw, O, I) kernel
  has its output channels on axis -2.
  """
  return batch_norm.fold(variables, out_axis=-2)


def init_variables(model: SonichuModel, rng: jax.Array, image_size: tuple[int, int] = (256, 256)):
  """Initialises every head and the backbone for `image_size` inputs; returns the variables dict."""
  return model.init(rng, jnp.zeros((1, *image_size, 3), model.dtype), method=SonichuModel.all_tasks)


def abstract_variables(model: SonichuModel, image_size: tuple[int, int] = (256, 256)):
  """Shapes and dtypes of `init_variables(model, ...)` without computing them (for conversion)."""
  return jax.eval_shape(lambda rng: init_variables(model, rng, image_size), jax.random.key(0))
