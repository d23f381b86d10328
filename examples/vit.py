"""A small Vision Transformer written with tf_keras layers (no pretrained weights)."""

import tfhybrid as th

keras = th.keras
layers = keras.layers


def small_vit(
    size: int = 32,
    channels: int = 3,
    patch: int = 4,
    width: int = 64,
    depth: int = 2,
    positions: bool = False,
) -> keras.Model:
    """Patch embedding, `depth` pre-norm blocks (4-head self-attention, a GELU MLP of
    twice the width), a final LayerNormalization, mean pooling and 10 logits.

    With `positions`, the patches' grid gets a conditional position encoding (a 3 x 3
    depthwise conv added to it, as CPVT's position encoding generator): without one the
    model sees a bag of patches and cannot tell where each came from."""
    inputs = keras.Input((size, size, channels))
    x = layers.Conv2D(width, patch, strides=patch, name="patches")(inputs)
    if positions:
        where = layers.DepthwiseConv2D(3, padding="same", name="positions")(x)
        x = layers.Add(name="patches_at")([x, where])
    x = layers.Reshape(((size // patch) ** 2, width), name="tokens")(x)
    for i in range(depth):
        y = layers.LayerNormalization(name=f"block{i}_ln1")(x)
        y = layers.MultiHeadAttention(4, width // 4, name=f"block{i}_attention")(y, y)
        x = layers.Add(name=f"block{i}_add1")([x, y])
        y = layers.LayerNormalization(name=f"block{i}_ln2")(x)
        y = layers.Dense(2 * width, activation="gelu", name=f"block{i}_mlp1")(y)
        x = layers.Add(name=f"block{i}_add2")([x, layers.Dense(width, name=f"block{i}_mlp2")(y)])
    x = layers.GlobalAveragePooling1D(name="pool")(layers.LayerNormalization(name="ln")(x))
    return keras.Model(inputs, layers.Dense(10, name="head")(x), name="small_vit")
