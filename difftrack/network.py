"""A small 3D U-Net (Flax NNX) that maps a canonical stack to particle centres.

Input: a stack resampled so that a particle's radius is ``CANONICAL_RADIUS`` voxels along
every axis and normalised (``neural.preprocess``), shape (batch, z, y, x, 1), each spatial
size a multiple of ``UNet.multiple``. Output, same spatial shape, 4 channels:

* channel 0: the logit of the centre likelihood (trained towards a Gaussian blob of std
  ``TARGET_SIGMA`` canonical voxels at each true centre, 1 at the centre);
* channels 1-3: the sub-voxel offset (z, y, x), in canonical voxels, from the voxel to the
  nearest true centre (trained near centres only).

No normalisation layer: the output at a voxel depends only on the input within the
receptive field (``UNet.reach`` voxels), so tiled inference equals whole-stack inference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_List = getattr(nnx, "List", list)  # flax >= 0.12 wants sub-module lists wrapped

CANONICAL_RADIUS = 3.0  # particle radius in canonical voxels
TARGET_SIGMA = 1.0  # std (canonical voxels) of the Gaussian blob the heatmap is trained on


class _Block(nnx.Module):
    """Two 3x3x3 convolutions with leaky-ReLU activations."""

    def __init__(self, cin, cout, *, rngs):
        self.c1 = nnx.Conv(cin, cout, (3, 3, 3), padding="SAME", rngs=rngs)
        self.c2 = nnx.Conv(cout, cout, (3, 3, 3), padding="SAME", rngs=rngs)

    def __call__(self, x):
        x = jax.nn.leaky_relu(self.c1(x), 0.1)
        return jax.nn.leaky_relu(self.c2(x), 0.1)


def _down(x):
    """2x2x2 average pooling (NDHWC)."""
    b, z, y, w, c = x.shape
    return x.reshape(b, z // 2, 2, y // 2, 2, w // 2, 2, c).mean(axis=(2, 4, 6))


def _up(x):
    """Nearest-neighbour 2x upsampling (NDHWC)."""
    for ax in (1, 2, 3):
        x = jnp.repeat(x, 2, axis=ax)
    return x


class UNet(nnx.Module):
    """3D U-Net: ``len(features) - 1`` poolings, features per level (default 8-16-32).

    Call with x of shape (batch, z, y, x, 1) (or (z, y, x), which gets batch and channel
    axes); returns (batch, z, y, x, 4) float32: heatmap logit and 3 offsets.
    """

    def __init__(self, features=(8, 16, 32), *, rngs: nnx.Rngs):
        features = tuple(int(f) for f in features)
        if len(features) < 2:
            raise ValueError("features needs at least two levels")
        self.features = features
        self.enc = _List([_Block(cin, cout, rngs=rngs) for cin, cout in
                             zip((1,) + features[:-1], features)])
        self.dec = _List([_Block(features[i] + features[i + 1], features[i], rngs=rngs)
                             for i in range(len(features) - 1)])
        self.head = nnx.Conv(features[0], 4, (1, 1, 1), rngs=rngs)

    @property
    def multiple(self):
        """Every spatial input size must be a multiple of this."""
        return 2 ** (len(self.features) - 1)

    @property
    def reach(self):
        """Voxels beyond which the input cannot change an output voxel (half the receptive
        field, plus the pooling grid's slack)."""
        n = len(self.features)
        r = 0
        for level in range(n):
            s = 2**level
            r += 2 * s  # two 3x3x3 convolutions at this scale (encoder)
            if level < n - 1:
                r += 2 * s  # the decoder's two at this scale
                r += s  # pooling / upsampling misalignment
        return r

    def __call__(self, x):
        squeeze = x.ndim == 3
        if squeeze:
            x = x[None, ..., None]
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = _down(x)
        for i in reversed(range(len(self.dec))):
            x = self.dec[i](jnp.concatenate([_up(x), skips[i]], axis=-1))
        out = self.head(x)
        return out[0] if squeeze else out


def count_params(model: nnx.Module) -> int:
    return int(sum(p.size for p in jax.tree_util.tree_leaves(nnx.state(model, nnx.Param))))


def new_unet(features=(8, 16, 32), seed=0) -> UNet:
    """A freshly initialised UNet, its initialisation compiled once (initialising it
    eagerly compiles every random initialiser for every shape: ~10x slower on CPU)."""
    features = tuple(int(f) for f in features)

    @jax.jit
    def init(key):
        return nnx.state(UNet(features, rngs=nnx.Rngs(params=key)))

    model = nnx.eval_shape(lambda: UNet(features, rngs=nnx.Rngs(0)))
    nnx.update(model, init(jax.random.key(int(seed))))
    return model
