"""The one place tfhybrid imports Keras.

tfhybrid uses Keras 2 (the `tf_keras` package), the Keras that TF-MOT supports.
Everything Keras-version specific (private classes included) is named here or in
`graph.py`, so a later Keras 3 port touches few files.
"""

from typing import Any

import tensorflow as tf
import tf_keras as keras
from tf_keras.src.applications.convnext import LayerScale
from tf_keras.src.engine import functional as keras_functional
from tf_keras.src.engine.keras_tensor import KerasTensor
from tf_keras.src.layers.core.tf_op_layer import SlicingOpLambda, TFOpLambda

# Layer families, by what they do to the channel axis.

#: Layers that apply the same function to every channel and keep the channel axis.
PASS_THROUGH = tuple(
    getattr(keras.layers, name)
    for name in (
        "Activation ReLU PReLU LeakyReLU ELU ThresholdedReLU Identity "
        "MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D "
        "AveragePooling3D GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D "
        "GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D "
        "ZeroPadding1D ZeroPadding2D ZeroPadding3D Cropping1D Cropping2D Cropping3D "
        "UpSampling1D UpSampling2D UpSampling3D Dropout SpatialDropout1D SpatialDropout2D "
        "SpatialDropout3D GaussianNoise GaussianDropout AlphaDropout ActivityRegularization"
    ).split()
)
#: Layers f with f(m * x) = m * f(x) for every per-channel scale m >= 0: a channel mask
#: applied to their input is already applied to their output.
SCALE_COMMUTING = (keras.layers.Flatten,) + tuple(
    getattr(keras.layers, name)
    for name in (
        "MaxPooling1D MaxPooling2D MaxPooling3D AveragePooling1D AveragePooling2D "
        "AveragePooling3D GlobalMaxPooling1D GlobalMaxPooling2D GlobalMaxPooling3D "
        "GlobalAveragePooling1D GlobalAveragePooling2D GlobalAveragePooling3D "
        "ZeroPadding1D ZeroPadding2D ZeroPadding3D Cropping1D Cropping2D Cropping3D "
        "Dropout SpatialDropout1D SpatialDropout2D SpatialDropout3D"
    ).split()
)
MERGE = tuple(
    getattr(keras.layers, name) for name in "Add Subtract Multiply Maximum Minimum Average".split()
)
TRANSPOSED_CONV = (
    keras.layers.Conv1DTranspose,
    keras.layers.Conv2DTranspose,
    keras.layers.Conv3DTranspose,
)
DEPTHWISE_CONV = (keras.layers.DepthwiseConv1D, keras.layers.DepthwiseConv2D)
SEPARABLE_CONV = (keras.layers.SeparableConv1D, keras.layers.SeparableConv2D)
#: Plain convolutions (the classes above derive from these or their base; test them first).
CONV = (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)


def is_grouped(layer) -> bool:
    """A grouped convolution (`Conv(groups=G)`, G > 1). With G equal to its input
    channels it is a depthwise conv written as a grouped one (ConvNeXt's)."""
    return isinstance(layer, CONV) and getattr(layer, "groups", 1) > 1


def is_factorable(layer) -> bool:
    """Whether a layer's kernel can be split in two by SVD: a Dense, or a plain
    channels-last Conv2D (not grouped, not a subclass such as a depthwise conv)."""
    if type(layer) is keras.layers.Dense:
        return True
    conv = type(layer) is keras.layers.Conv2D
    return conv and layer.groups == 1 and layer.data_format == "channels_last"


def call_with_kernel(layer, inputs, kernel):
    """`layer` (a Dense, Conv or DepthwiseConv2D) on `inputs`, computing with `kernel` in
    place of its own (a depthwise kernel for a DepthwiseConv2D), then its bias and
    activation: for training-time layers that derive the kernel they compute with."""
    if isinstance(layer, keras.layers.Dense):
        outputs = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
    elif isinstance(layer, keras.layers.DepthwiseConv2D):
        outputs = keras.backend.depthwise_conv2d(
            inputs,
            kernel,
            strides=layer.strides,
            padding=layer.padding,
            data_format=layer.data_format,
            dilation_rate=layer.dilation_rate,
        )
    else:
        outputs = layer.convolution_op(inputs, kernel)
    if layer.use_bias:
        first = getattr(layer, "data_format", None) == "channels_first"
        outputs = tf.nn.bias_add(outputs, layer.bias, data_format="NCHW" if first else None)
    return layer.activation(outputs)


def build_self_attention(layer: Any, input_shape: Any) -> None:
    """Builds a `MultiHeadAttention` for self-attention on inputs of `input_shape`
    (query, value and key alike) as its first call would, projections and their kernels
    included: TF-MOT's pruning wrapper looks the kernels up in its own `build`. (It calls
    private methods, hence here.)"""
    shape = tf.TensorShape(input_shape)
    if not getattr(layer, "_built_from_signature", False):
        layer._build_from_signature(query=shape, value=shape)
    heads = shape[:-1].concatenate([layer._num_heads, layer._value_dim or layer._key_dim])
    projections = (layer._query_dense, layer._key_dense, layer._value_dense, layer._output_dense)
    for projection, inputs in zip(projections, (shape, shape, shape, heads)):
        if not projection.built:
            with tf.name_scope(projection.name):  # query/kernel, ..., as its own call names
                projection.build(inputs)


@keras.utils.register_keras_serializable(package="tfhybrid")
class HeadWeightedAttention(keras.layers.MultiHeadAttention):
    """A MultiHeadAttention that scales each head's output by `head_weights` (one value
    per head) before the output projection: with 0/1 weights, the layer without the
    heads weighted 0. (It overrides the private `_compute_attention`, hence here.)"""

    def call(
        self,
        query,
        value,
        key=None,
        attention_mask=None,
        return_attention_scores=False,
        training=None,
        use_causal_mask=False,
        head_weights=None,
    ):
        self._head_weights = head_weights
        try:
            return super().call(
                query,
                value,
                key=key,
                attention_mask=attention_mask,
                return_attention_scores=return_attention_scores,
                training=training,
                use_causal_mask=use_causal_mask,
            )
        finally:
            self._head_weights = None

    def _compute_attention(self, *args, **kwargs):
        output, scores = super()._compute_attention(*args, **kwargs)
        if getattr(self, "_head_weights", None) is not None:  # output: (..., heads, dim)
            output = output * tf.cast(self._head_weights, output.dtype)[:, None]
        return output, scores


def nested_io(model: keras.Model) -> tuple:
    """A functional model's inputs and outputs in the structure it was built with."""
    return model._nested_inputs, model._nested_outputs  # noqa: SLF001 - no public getter


def steps_per_execution(model: keras.Model) -> int:
    """The `steps_per_execution` a model was compiled with (1 if not compiled)."""
    per_call = model._steps_per_execution  # noqa: SLF001 - Keras keeps no public getter
    return 1 if per_call is None else int(per_call.numpy())


__all__ = [
    "keras",
    "HeadWeightedAttention",
    "is_grouped",
    "LayerScale",
    "SlicingOpLambda",
    "TFOpLambda",
    "is_factorable",
    "keras_functional",
    "nested_io",
    "steps_per_execution",
    "KerasTensor",
    "CONV",
    "DEPTHWISE_CONV",
    "MERGE",
    "PASS_THROUGH",
    "SCALE_COMMUTING",
    "SEPARABLE_CONV",
    "TRANSPOSED_CONV",
]
