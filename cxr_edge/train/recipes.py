"""The three published CXR recipes as presets: architecture, preprocessing and hyper-parameters.

Each preset reproduces the published notebook's choices (noted per field); every field can be
overridden from :class:`~cxr_edge.train.trainer.TrainConfig` or the CLI. All models are built
functional (tf2onnx cannot convert Keras 3 Sequential models) with a uint8 input and the
preprocessing layer first, and the backbone's layers inlined, so Grad-CAM can name
``conv5_block3_out`` directly.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..classes import COVID, NORMAL, VIRAL_PNEUMONIA
from ..errors import ConfigError
from ..extras import require
from ..preprocess import NormMode, PreprocessSpec


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    classes: tuple[str, ...]
    image_size: int
    mode: NormMode
    optimizer: str  # "sgd" | "adam"
    learning_rate: float
    batch_size: int
    epochs: int
    featurewise: bool = False  # fit mean/std on the training split (ResNet152V2 recipe)
    zoom: float = 0.0  # random zoom augmentation range
    early_stopping_patience: int | None = None
    fine_tune_epochs: int = 0
    fine_tune_learning_rate: float = 1e-5
    fine_tune_from: str | None = None  # first layer-name prefix unfrozen for fine-tuning
    frozen_layers: int | None = None  # freeze the first N backbone layers (None: all)
    backbone: str | None = None
    last_conv_layer: str | None = None  # Grad-CAM target
    val_fraction: float = 0.15
    test_fraction: float = 0.15

    def spec(self, image_size: int | None = None) -> PreprocessSpec:
        s = image_size or self.image_size
        return PreprocessSpec(height=s, width=s, mode=self.mode, input_channels=1, model_channels=3)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(
            name="small_cnn",
            description="CNN from scratch, 128x128, COVID vs Normal (published Keras notebook)",
            classes=(COVID, NORMAL), image_size=128, mode=NormMode.RESCALE,
            optimizer="sgd", learning_rate=1e-3, batch_size=32, epochs=10,
            last_conv_layer="conv2",
        ),
        Recipe(
            name="resnet50_tl",
            description="ResNet50 transfer learning: frozen base + dense head, then fine-tuning",
            classes=(COVID, NORMAL), image_size=224, mode=NormMode.CAFFE,
            optimizer="sgd", learning_rate=1e-4, batch_size=64, epochs=30,
            early_stopping_patience=5, fine_tune_epochs=5, fine_tune_learning_rate=1e-5,
            fine_tune_from="conv5_", backbone="ResNet50", last_conv_layer="conv5_block3_out",
        ),
        Recipe(
            name="resnet152v2_tl",
            description="ResNet152V2, first 300 layers frozen, 3 classes, zoom augmentation",
            classes=(COVID, NORMAL, VIRAL_PNEUMONIA), image_size=224, mode=NormMode.TF,
            optimizer="adam", learning_rate=0.01, batch_size=32, epochs=10,
            featurewise=True, zoom=0.07, frozen_layers=300, backbone="ResNet152V2",
            last_conv_layer="post_relu", val_fraction=0.10, test_fraction=0.15,
        ),
    )
}


def get_recipe(name: str) -> Recipe:
    try:
        return RECIPES[name]
    except KeyError:
        raise ConfigError(f"Unknown recipe {name!r}; choose one of {', '.join(RECIPES)}.") from None


def resolve_weights(weights: str | None) -> str | None:
    """``imagenet`` | a local ``.h5`` file | ``none``: what Keras applications accept."""
    if weights is None or str(weights).lower() in ("none", ""):
        return None
    if weights == "imagenet":
        return "imagenet"
    path = Path(weights).expanduser()
    if not path.is_file():
        raise ConfigError(
            f"Base weights {weights!r} are neither 'imagenet', 'none', nor an existing file. "
            "Pass a local .h5 of the no-top backbone, or 'none' to train from scratch."
        )
    return str(path)


def _backbone(backbone: str, x, weights: str | None):
    keras = require("keras")
    ctor = getattr(keras.applications, backbone)
    try:
        base = ctor(include_top=False, weights=weights, input_tensor=x)
    except Exception as exc:
        if weights == "imagenet":
            raise ConfigError(
                f"Could not load ImageNet weights for {backbone} ({exc}). Without internet, "
                "copy the '*_notop.h5' file into ~/.keras/models/, or pass --weights PATH.h5, or "
                "--weights none."
            ) from exc
        raise
    return base


def build_model(recipe: Recipe, spec: PreprocessSpec, weights: str | None = None):
    """The recipe's network, taking packed uint8 images; ``weights`` only matters for backbones."""
    keras = require("keras")
    from ..keras_layers import CxrPreprocess

    L = keras.layers
    inp = keras.Input(shape=spec.input_shape, dtype="uint8", name="image")
    x = CxrPreprocess(spec.to_dict(), name="preprocess")(inp)
    n = len(recipe.classes)
    if recipe.backbone is None:
        x = L.Conv2D(32, 5, activation="relu", name="conv1")(x)
        x = L.MaxPooling2D(2, name="pool1")(x)
        x = L.Conv2D(64, 5, activation="relu", name="conv2")(x)
        x = L.MaxPooling2D(2, name="pool2")(x)
        x = L.Flatten(name="flatten")(x)
        x = L.Dense(512, activation="relu", name="fc1")(x)
    else:
        base = _backbone(recipe.backbone, x, resolve_weights(weights))
        # base.layers starts with our uint8 input and preprocessing layer; the published count
        # ("first 300 layers") is of keras.applications' own list, which starts with one InputLayer.
        body = [l for l in base.layers if not isinstance(l, (L.InputLayer, CxrPreprocess))]
        frozen = body if recipe.frozen_layers is None else body[: recipe.frozen_layers - 1]
        for layer in frozen:
            layer.trainable = False
        x = L.GlobalAveragePooling2D(name="gap")(base.output)
        if recipe.name == "resnet50_tl":
            for i, units in enumerate((1024, 1024, 1024, 512)):
                x = L.Dense(units, activation="relu", name=f"head_dense{i + 1}")(x)
        else:
            for i, units in enumerate((512, 256, 64)):
                x = L.Dense(units, activation="relu", name=f"head_dense{i + 1}")(x)
                x = L.Dropout(0.3, name=f"head_dropout{i + 1}")(x)
                x = L.BatchNormalization(name=f"head_bn{i + 1}")(x)
    out = L.Dense(n, activation="softmax", name="probs")(x)
    return keras.Model(inp, out, name=recipe.name)


def make_optimizer(name: str, learning_rate: float):
    keras = require("keras")
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate)
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    raise ConfigError(f"Unknown optimizer {name!r}; use 'sgd' or 'adam'.")


def with_overrides(recipe: Recipe, **overrides) -> Recipe:
    """The recipe with non-None overrides applied (CLI flags map straight onto this)."""
    return dataclasses.replace(recipe, **{k: v for k, v in overrides.items() if v is not None})
