"""From a Keras model to the chain of operations the bounds propagate through.

`network` reads a model as a list of `tf_large_margin.bound_operations` operations
h_0 = x -> h_1 -> ... -> h_n = the logits, in float64 and in inference mode, and
`check_reproduces` checks that they give the model's logits.

Supported models: Keras functional or Sequential models (nested ones included) that
form a chain of Dense and Conv2D (channels_last, any padding, stride and dilation,
with or without bias, activation relu or linear), ReLU, Activation (relu, linear),
MaxPooling2D, AveragePooling2D, BatchNormalization (with its moving statistics, as in
inference; subclasses such as `BatchNormalizationTF1` included), Flatten, Reshape,
Dropout (the identity at inference) and InputLayer, returning logits. Anything else
raises ValueError naming the layer.

A functional model's graph is read from its public config (`model.get_config()`:
each layer's inbound nodes name the layer and node that produced their input).
"""

import keras
import numpy as np
import tensorflow as tf

from tf_large_margin import bound_operations

# Relative tolerance of the check that the parsed layers reproduce the model's logits.
_REPRODUCTION_TOLERANCE = {tf.float64: 1e-8, tf.float32: 1e-3}
_HALF_PRECISION_TOLERANCE = 3e-2


SUPPORTED = (
    "Dense, Conv2D (channels_last, groups=1), ReLU, Activation, MaxPooling2D, "
    "AveragePooling2D, BatchNormalization, Flatten, Reshape, Dropout, InputLayer"
)


def describe(layer):
  """ "'name' (Type)" of a layer or operation, for error messages."""
  return f"'{getattr(layer, 'name', '?')}' ({type(layer).__name__})"


def activation_operations(layer, activation):
  """[ReLU()] for relu, [] for linear; ValueError for any other activation."""
  if activation is keras.activations.relu:
    return [bound_operations.ReLU()]
  if activation is None or activation is keras.activations.linear:
    return []
  name = getattr(activation, "__name__", repr(activation))
  raise ValueError(
      f"Layer {describe(layer)} has activation '{name}': certified bounds support "
      "relu and linear activations only (the model must return logits)."
  )


def check_channels_last(layer):
  """ValueError unless the layer's data_format is channels_last."""
  if getattr(layer, "data_format", "channels_last") != "channels_last":
    raise ValueError(
        f"Layer {describe(layer)} has data_format={layer.data_format!r}: certified "
        "bounds support channels_last only."
    )


def numpy(variable):
  """A layer variable as a float64 numpy array."""
  return np.asarray(keras.ops.convert_to_numpy(variable), np.float64)


def dense_operations(layer):
  """keras.layers.Dense: the affine map, then its activation."""
  if getattr(layer, "quantization_mode", None):
    raise ValueError(f"Layer {describe(layer)} is quantized: not supported.")
  bias = numpy(layer.bias) if layer.use_bias else None
  return [bound_operations.Dense(numpy(layer.kernel), bias)] + activation_operations(
      layer, layer.activation
  )


def conv_operations(layer):
  """keras.layers.Conv2D: the convolution, then its activation."""
  check_channels_last(layer)
  if getattr(layer, "groups", 1) != 1:
    raise ValueError(
        f"Layer {describe(layer)} has groups={layer.groups}: certified bounds "
        "support groups=1 only."
    )
  if getattr(layer, "quantization_mode", None):
    raise ValueError(f"Layer {describe(layer)} is quantized: not supported.")
  bias = numpy(layer.bias) if layer.use_bias else None
  convolution = bound_operations.Convolution(
      numpy(layer.kernel),
      bias,
      tuple(layer.strides),
      layer.padding,
      tuple(layer.dilation_rate),
  )
  return [convolution] + activation_operations(layer, layer.activation)


def relu_operations(layer):
  """keras.layers.ReLU with its default arguments (max(h, 0))."""
  settings = (layer.max_value, float(layer.negative_slope), float(layer.threshold))
  if settings != (None, 0.0, 0.0):
    raise ValueError(
        f"Layer {describe(layer)} has max_value={layer.max_value}, negative_slope="
        f"{layer.negative_slope}, threshold={layer.threshold}: certified bounds "
        "support the plain ReLU max(h, 0) only."
    )
  return [bound_operations.ReLU()]


def pooling_operations(layer, operation):
  """MaxPooling2D / AveragePooling2D as ``operation(pool_size, strides, padding)``."""
  check_channels_last(layer)
  return [operation(tuple(layer.pool_size), tuple(layer.strides), layer.padding)]


def batch_norm_operations(layer, in_shape):
  """Inference-mode batch normalisation as the per-channel `Scale`."""
  if getattr(layer, "renorm", False):
    raise ValueError(
        f"Layer {describe(layer)} uses batch renormalisation: not supported."
    )
  rank = len(in_shape) + 1
  axis = layer.axis if isinstance(layer.axis, int) else tuple(layer.axis)
  if not isinstance(axis, int):
    if len(axis) != 1:
      raise ValueError(
          f"Layer {describe(layer)} normalises over axes {axis}: certified bounds "
          "support one channel axis."
      )
    axis = axis[0]
  axis = axis % rank
  if axis == 0:
    raise ValueError(f"Layer {describe(layer)} normalises over the batch axis.")
  channels = in_shape[axis - 1]
  mean, variance = numpy(layer.moving_mean), numpy(layer.moving_variance)
  gamma = numpy(layer.gamma) if layer.scale else np.ones(channels)
  beta = numpy(layer.beta) if layer.center else np.zeros(channels)
  scale = gamma / np.sqrt(variance + layer.epsilon)
  shape = [1] * len(in_shape)
  shape[axis - 1] = channels
  return [
      bound_operations.Scale(scale.reshape(shape), (beta - scale * mean).reshape(shape))
  ]


def reshape_operations(layer, in_shape):
  """Flatten (in channels_last order) and Reshape: a `Reshape`."""
  if isinstance(layer, keras.layers.Flatten):
    if len(in_shape) > 1:
      check_channels_last(layer)
    return [bound_operations.Reshape()]
  return [bound_operations.Reshape(layer.target_shape)]


def layer_operations(layer, in_shape):
  """The operations computing ``layer`` in inference mode; ValueError if it is not
  supported (the message names the layer and its type)."""
  if isinstance(layer, (keras.layers.InputLayer, keras.layers.Dropout)):
    return []
  if isinstance(layer, keras.layers.Dense):
    return dense_operations(layer)
  if isinstance(layer, keras.layers.Conv2D):
    return conv_operations(layer)
  if isinstance(layer, keras.layers.ReLU):
    return relu_operations(layer)
  if isinstance(layer, keras.layers.Activation):
    return activation_operations(layer, layer.activation)
  if isinstance(layer, keras.layers.MaxPooling2D):
    return pooling_operations(layer, bound_operations.MaxPooling)
  if isinstance(layer, keras.layers.AveragePooling2D):
    return pooling_operations(layer, bound_operations.AveragePooling)
  if isinstance(layer, keras.layers.BatchNormalization):
    return batch_norm_operations(layer, in_shape)
  if isinstance(layer, (keras.layers.Flatten, keras.layers.Reshape)):
    return reshape_operations(layer, in_shape)
  raise ValueError(
      f"Layer {describe(layer)} is not supported by certified bounds; supported: "
      f"{SUPPORTED}."
  )


# The class_name of a symbolic tensor in a functional model's config.
KERAS_TENSOR = "__keras_tensor__"


def config_tensors(structure):
  """The symbolic tensors in (part of) a functional model's config, in order, as
  their ``keras_history`` ``(layer name, node index, tensor index)``: the node index
  counts the calls of that layer within the model."""
  if isinstance(structure, dict):
    if structure.get("class_name") == KERAS_TENSOR:
      return [tuple(structure["config"]["keras_history"])]
    structure = list(structure.values())
  if not isinstance(structure, (list, tuple)):
    return []
  return [tensor for value in structure for tensor in config_tensors(value)]


def graph_nodes(model):
  """{layer name: the layer's calls in the model}, read from ``model.get_config()``.

  Each call (node) holds the serialized ``args`` and ``kwargs`` the layer was called
  with; an InputLayer has no calls.
  """
  try:
    config = model.get_config()
  except (NotImplementedError, TypeError) as error:
    raise ValueError(
        f"Model {describe(model)}: its layer graph cannot be read from its config "
        f"({error})."
    ) from error
  if not isinstance(config, dict) or not isinstance(config.get("layers"), list):
    raise ValueError(
        f"Model {describe(model)}: certified bounds need a Sequential or functional "
        "model (a subclassed model has no layer graph)."
    )
  return {layer["name"]: layer["inbound_nodes"] for layer in config["layers"]}


def output_node(model, nodes):
  """``(layer name, node index)`` of the call computing the model's output: the
  one call whose output no other call takes (the graph has one output)."""
  taken = {
      tensor[:2]
      for calls in nodes.values()
      for call in calls
      for tensor in config_tensors(call)
  }
  last = [
      (name, index)
      for name, calls in nodes.items()
      for index in range(len(calls))
      if (name, index) not in taken
  ]
  if len(last) != 1:
    raise ValueError(
        f"Model {describe(model)}: certified bounds support chains of layers with "
        f"one output; the graph ends in {len(last)} layer calls."
    )
  return last[0]


def functional_chain(model):
  """The layers of a functional model from input to output, which must be a chain
  (one input, one output, each layer applied to the previous layer's output).

  The graph is walked back from the output through the public config: each call
  names the layer and call whose output it takes, until the InputLayer.
  """
  inputs, outputs = getattr(model, "inputs", None), getattr(model, "outputs", None)
  if not inputs or not outputs or len(inputs) != 1 or len(outputs) != 1:
    raise ValueError(
        f"Model {describe(model)}: certified bounds need a Sequential or functional "
        "model with one input and one output (a subclassed model has no layer graph)."
    )
  nodes = graph_nodes(model)
  if not any(nodes.values()):  # the output is the input
    return []
  chain, (name, index) = [], output_node(model, nodes)
  while nodes[name]:  # an InputLayer has no calls: the input is reached
    call, layer = nodes[name][index], model.get_layer(name)
    tensors = config_tensors(call)
    if len(tensors) != 1:
      raise ValueError(
          f"Layer {describe(layer)} has {len(tensors)} inputs: certified bounds "
          "support chains of single-input layers only."
      )
    if call.get("kwargs", {}).get("training"):
      raise ValueError(
          f"Layer {describe(layer)} is called with training=True in the model: "
          "certified bounds hold for the inference-mode network only."
      )
    chain.append(layer)
    name, index, _ = tensors[0]
  return chain[::-1]


def layer_chain(model):
  """The layers of a Sequential or functional model in order, nested models
  expanded."""
  if isinstance(model, keras.Sequential):
    layers = list(model.layers)
  elif isinstance(model, keras.Model):
    layers = functional_chain(model)
  else:
    raise ValueError(f"model must be a Keras model; got {type(model).__name__}.")
  chain = []
  for layer in layers:
    chain.extend(layer_chain(layer) if isinstance(layer, keras.Model) else [layer])
  return chain


def network(model, input_shape):
  """The operations of ``model`` on inputs [batch, *input_shape], with their
  ``in_shape`` and ``out_shape`` set; the output must be [batch, classes]."""
  operations, shape = [], tuple(input_shape)
  for layer in layer_chain(model):
    for operation in layer_operations(layer, shape):
      operation.in_shape = shape
      out = operation.apply(tf.zeros((1,) + shape, bound_operations.DTYPE))
      operation.out_shape = shape = tuple(out.shape[1:])
      operations.append(operation)
  if len(shape) != 1:
    raise ValueError(
        f"The model must return logits of shape [batch, classes]; the parsed layers "
        f"give [batch, {', '.join(map(str, shape))}]."
    )
  return operations


def forward(operations, x):
  """The network's logits in float64: the operations applied in turn."""
  for operation in operations:
    x = operation.apply(x)
  return x


def check_reproduces(model, operations, x):
  """ValueError unless the parsed operations give the model's inference logits on
  ``x`` (to the model dtype's rounding): catches layers whose behaviour differs from
  the layer type they subclass. The model gets ``x`` as is (a float64 model its
  float64 values), and the tolerance is that of its least precise input or logits
  dtype (a float32 input layer rounds x)."""
  logits = model(x, training=False)
  inputs = getattr(model, "inputs", None) or []
  dtypes = [logits.dtype] + [tf.as_dtype(i.dtype) for i in inputs]
  tolerance = max(
      _REPRODUCTION_TOLERANCE.get(dtype, _HALF_PRECISION_TOLERANCE) for dtype in dtypes
  )
  logits = tf.cast(logits, bound_operations.DTYPE)
  scale = 1.0 + tf.reduce_max(tf.abs(logits), axis=1)
  error = tf.reduce_max(tf.abs(forward(operations, x) - logits), axis=1) / scale
  error = float(tf.reduce_max(error))
  if error > tolerance:
    raise ValueError(
        "The model's layers, read as the supported layer types in inference mode, "
        f"do not reproduce its logits (relative error {error:.3g}): a layer "
        "subclass probably changes its computation."
    )
  return logits
