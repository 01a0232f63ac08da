"""Run a recipe end to end: scan -> split -> pack -> tf.data -> fit (-> fine-tune) -> manifest."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..classes import COVID
from ..data import scan_dataset, split_dataset
from ..data.loading import load_images
from ..data.split import split_counts
from ..decision import choose_threshold
from ..errors import DatasetError
from ..extras import require
from ..manifest import ArtifactManifest
from ..manifest_schema import (
    ArtifactFormat,
    DataProvenance,
    OperatingPoint,
    SelfCheckRecord,
    TensorSpec,
    Training,
    TrainingMetrics,
)
from ..precision import Precision
from .recipes import Recipe, build_model, get_recipe, make_optimizer, with_overrides

log = logging.getLogger(__name__)

MODEL_FILE = "model.keras"
HISTORY_FILE = "history.csv"


@dataclass(frozen=True)
class TrainConfig:
    recipe: str = "small_cnn"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate: float | None = None
    image_size: int | None = None
    fine_tune_epochs: int | None = None
    weights: str | None = "imagenet"  # backbone recipes only: 'imagenet' | path.h5 | 'none'
    seed: int = 0
    target_sensitivity: float = 0.95
    metadata_csv: str | None = None
    max_images: int | None = None  # cap per split, for smoke runs
    precise_bn: bool | None = None  # re-estimate trainable BN statistics before validation (None: when any)
    verbose: int = 2

    def resolved_recipe(self) -> Recipe:
        return with_overrides(
            get_recipe(self.recipe), epochs=self.epochs, batch_size=self.batch_size,
            learning_rate=self.learning_rate, image_size=self.image_size,
            fine_tune_epochs=self.fine_tune_epochs,
        )


@dataclass
class TrainResult:
    model_path: Path
    manifest_path: Path
    history_path: Path
    val_metrics: dict


def _tf_dataset(x, y, batch_size, *, shuffle: bool, zoom: float, seed: int):
    tf = require("tensorflow")
    keras = require("keras")
    ds = tf.data.Dataset.from_tensor_slices((x, y))
    if shuffle:
        ds = ds.shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    if zoom:
        zoomer = keras.layers.RandomZoom(zoom, fill_mode="constant", seed=seed)

        def augment(images, labels):
            z = zoomer(tf.cast(images, tf.float32), training=True)
            return tf.cast(tf.clip_by_value(tf.round(z), 0, 255), tf.uint8), labels

        ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


def precise_batchnorm_callback(x_train: np.ndarray, batch_size: int, max_batches: int = 10, seed: int = 0):
    """Re-estimate trainable BatchNorm statistics on training images before every validation.

    Keras keeps BN moving averages with momentum 0.99, so after a few dozen steps they still mostly
    hold their initial values (mean 0, variance 1) while training itself uses batch statistics. On a
    network whose upper blocks train from scratch (ResNet152V2 with weights=None) inference then runs
    on wrong statistics: validation loss in the hundreds, saturated logits that no INT8 scale can
    represent. Averaging batch statistics over ``max_batches`` clean training batches ("precise BN",
    Wu & Johnson 2021) gives the population estimate the model is actually trained for.
    """
    keras = require("keras")
    rng = np.random.default_rng(seed)
    callback: Any = keras.callbacks.Callback  # a base class from the module imported here, at run time

    class PreciseBatchNorm(callback):
        def on_test_begin(self, logs=None):
            bns = [l for l in self.model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization) and l.trainable]
            if not bns:
                return
            saved = [l.momentum for l in bns]
            order = rng.permutation(len(x_train))
            try:
                for k in range(min(max_batches, max(1, len(x_train) // batch_size))):
                    for layer in bns:  # running average: moving = (k * moving + batch) / (k + 1)
                        layer.momentum = k / (k + 1)
                    self.model(x_train[order[k * batch_size:(k + 1) * batch_size]], training=True)
            finally:
                for layer, m in zip(bns, saved):
                    layer.momentum = m

    return PreciseBatchNorm()


def has_trainable_batchnorm(model) -> bool:
    keras = require("keras")
    return any(isinstance(l, keras.layers.BatchNormalization) and l.trainable for l in model._flatten_layers())


def _cap(items, n, seed):
    if n is None or len(items) <= n:
        return items
    idx = np.sort(np.random.default_rng(seed).choice(len(items), n, replace=False))
    return [items[i] for i in idx]


def train(config: TrainConfig, data_dir: str | Path, out_dir: str | Path) -> TrainResult:
    """Split, pack, fit (and fine-tune), choose the operating point on validation, write the model's manifest."""
    keras = require("keras")
    recipe = config.resolved_recipe()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    data = _split_data(config, recipe, data_dir)
    base = recipe.spec()
    packed = _pack_splits(data, base, config)  # packing is uint8: featurewise statistics do not touch it
    spec = _featurewise(recipe, base, packed.x_tr)
    model_path, history_path = out / MODEL_FILE, out / HISTORY_FILE
    phases = _fit(recipe, spec, config, packed, model_path, history_path)
    best, metrics, operating = _validate(model_path, packed, data.ds.classes, recipe.batch_size, config.target_sensitivity)
    manifest = _training_manifest(recipe, config, spec, data, packed, phases, history_path, metrics, operating,
                                  _self_check_record(best, spec), data_dir)
    mpath = manifest.write(model_path)
    log.info("saved %s (val accuracy %.3f)", model_path, metrics.val_accuracy_argmax)
    return TrainResult(model_path, mpath, history_path, metrics.to_dict())


@dataclass(frozen=True)
class _SplitData:
    """The scanned dataset and its train/val/test split, as recorded in the manifest."""

    ds: Any
    fractions: tuple[float, float, float]
    splits: dict
    counts: dict


@dataclass(frozen=True)
class _Packed:
    """Training and validation images packed once (uint8, the model's input size), with their labels."""

    x_tr: np.ndarray
    y_tr: np.ndarray
    x_va: np.ndarray
    y_va: np.ndarray
    n_classes: int
    skipped: list[str]


def _split_data(config: TrainConfig, recipe: Recipe, data_dir: str | Path) -> _SplitData:
    ds = scan_dataset(data_dir, classes=recipe.classes, metadata_csv=config.metadata_csv)
    log.info("%s", ds.summary())
    fractions = (1 - recipe.val_fraction - recipe.test_fraction, recipe.val_fraction, recipe.test_fraction)
    splits = split_dataset(ds, fractions, seed=config.seed)
    counts = split_counts(splits, ds.classes)
    log.info("split counts: %s", counts)
    for s in ("train", "val"):
        if not splits[s]:
            raise DatasetError(f"The {s} split is empty ({counts}); add images or change the split fractions.")
    return _SplitData(ds, fractions, splits, counts)


def _pack_splits(data: _SplitData, spec, config: TrainConfig) -> _Packed:
    packed = {}
    for s in ("train", "val"):
        items = _cap(data.splits[s], config.max_images, config.seed)
        loaded = load_images([i.path for i in items], spec, progress=config.verbose > 0)
        labels = np.array([data.ds.classes.index(items[k].label) for k in loaded.kept])
        packed[s] = (loaded.x, labels, loaded.errors)
    (x_tr, y_tr, err_tr), (x_va, y_va, err_va) = packed["train"], packed["val"]
    return _Packed(x_tr, y_tr, x_va, y_va, len(data.ds.classes), [str(e) for e in err_tr + err_va])


def _featurewise(recipe: Recipe, spec, x_tr: np.ndarray):
    """The spec with the recipe's featurewise statistics, fitted on the mode-scaled training pixels (model channels
    are replicas of gray), or the spec as it is."""
    if not recipe.featurewise:
        return spec
    scaled = spec.normalize(x_tr[:2000])
    return spec.with_stats(float(scaled.mean()), float(scaled.std() + 1e-7))


def _fit(recipe: Recipe, spec, config: TrainConfig, packed: _Packed, model_path: Path, history_path: Path) -> list[dict]:
    """Build, compile and fit the model (the best epoch is checkpointed to ``model_path``); returns the phases run."""
    keras = require("keras")
    n = packed.n_classes
    model = build_model(recipe, spec, config.weights)
    model.compile(optimizer=make_optimizer(recipe.optimizer, recipe.learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    train_ds = _tf_dataset(packed.x_tr, np.eye(n)[packed.y_tr], recipe.batch_size, shuffle=True, zoom=recipe.zoom,
                           seed=config.seed)
    val_ds = _tf_dataset(packed.x_va, np.eye(n)[packed.y_va], recipe.batch_size, shuffle=False, zoom=0, seed=config.seed)
    checkpoint = keras.callbacks.ModelCheckpoint(model_path, monitor="val_loss", save_best_only=True)
    callbacks = [checkpoint, keras.callbacks.CSVLogger(history_path)]
    precise_bn = has_trainable_batchnorm(model) if config.precise_bn is None else config.precise_bn
    if precise_bn:  # before the checkpoint judges val_loss
        callbacks.insert(0, precise_batchnorm_callback(packed.x_tr, recipe.batch_size, seed=config.seed))
    if recipe.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(monitor="val_loss", patience=recipe.early_stopping_patience,
                                                       restore_best_weights=True))
    hist = model.fit(train_ds, validation_data=val_ds, epochs=recipe.epochs, callbacks=callbacks, verbose=config.verbose,
                     shuffle=False)
    phases = [{"phase": "head" if recipe.backbone else "train", "epochs": len(hist.epoch),
               "learning_rate": recipe.learning_rate, "precise_batchnorm": bool(precise_bn)}]
    if recipe.fine_tune_epochs and recipe.fine_tune_from:
        phases.append(_fine_tune(model, recipe, config, train_ds, val_ds, callbacks, len(hist.epoch), history_path))
    return phases


def _fine_tune(model, recipe: Recipe, config: TrainConfig, train_ds, val_ds, callbacks: list, start: int,
               history_path: Path) -> dict:
    """Unfreeze from ``recipe.fine_tune_from`` on (BatchNorm stays frozen) and train on at the fine-tune rate."""
    keras = require("keras")
    unfrozen = 0
    started = False
    for layer in model.layers:
        started = started or layer.name.startswith(recipe.fine_tune_from)
        # BatchNorm stays frozen: its batch statistics on small CXR batches would wreck the
        # ImageNet ones (the usual Keras fine-tuning advice).
        if started and not isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = True
            unfrozen += 1
    model.compile(optimizer=make_optimizer(recipe.optimizer, recipe.fine_tune_learning_rate),
                  loss="categorical_crossentropy", metrics=["accuracy"])
    callbacks = [c for c in callbacks if not isinstance(c, keras.callbacks.CSVLogger)]
    callbacks.append(keras.callbacks.CSVLogger(history_path, append=True))
    ft = model.fit(train_ds, validation_data=val_ds, initial_epoch=start, epochs=start + recipe.fine_tune_epochs,
                   callbacks=callbacks, verbose=config.verbose, shuffle=False)
    return {"phase": "fine_tune", "epochs": len(ft.epoch), "from_layer": recipe.fine_tune_from,
            "layers_unfrozen": unfrozen, "learning_rate": recipe.fine_tune_learning_rate}


def _validate(model_path: Path, packed: _Packed, classes, batch_size: int, target_sensitivity: float):
    """The checkpointed best model, its validation accuracy, and the COVID operating point chosen on validation."""
    from ..keras_layers import load_keras_model

    best = load_keras_model(model_path)
    p_val = best.predict(packed.x_va, batch_size=batch_size, verbose=0)
    metrics = TrainingMetrics(float((p_val.argmax(1) == packed.y_va).mean()), int(len(packed.y_va)))
    operating = None
    if COVID in classes:
        ci = classes.index(COVID)
        chosen = choose_threshold(packed.y_va == ci, p_val[:, ci], target_sensitivity)
        operating = OperatingPoint.from_dict({**chosen, "chosen_on": "val"}, "operating_point")
    return best, metrics, operating


def _training_manifest(recipe: Recipe, config: TrainConfig, spec, data: _SplitData, packed: _Packed, phases: list[dict],
                       history_path: Path, metrics: TrainingMetrics, operating: OperatingPoint | None, self_check: dict,
                       data_dir: str | Path) -> ArtifactManifest:
    ds = data.ds
    return ArtifactManifest(
        kind="keras-model", format=ArtifactFormat.KERAS, recipe=recipe.name,
        recipe_config={k: (v.value if hasattr(v, "value") else v) for k, v in asdict(recipe).items()},
        classes=tuple(ds.classes), preprocess=spec, last_conv_layer=recipe.last_conv_layer,
        outputs=tuple(TensorSpec(n) for n in ("probs", "features")[: 2 if recipe.last_conv_layer else 1]),
        precision=Precision.FP32,
        weights=config.weights if recipe.backbone else None, seed=config.seed,
        training=Training.from_dict({"phases": phases, "history": history_path.name}, "training"),
        data=DataProvenance(
            root=str(Path(data_dir).resolve()), fingerprint=ds.fingerprint(), n_images=len(ds.items),
            split_fractions=data.fractions, split_seed=config.seed, split_counts=data.counts, presplit=ds.presplit,
            max_images=config.max_images, skipped=tuple(packed.skipped),
            ignored=tuple(f"{p}: {why}" for p, why in ds.ignored), provenance_file=ds.provenance_file),
        operating_point=operating, metrics=metrics,
        self_check=SelfCheckRecord.from_dict(self_check, "self_check"),
    )

def load_model_and_manifest(model_path: str | Path):
    """A trained ``.keras`` model with its verified manifest."""
    from ..keras_layers import load_keras_model
    from ..manifest import read_manifest

    doc = read_manifest(model_path)
    return load_keras_model(model_path), doc



def _self_check_record(model, spec) -> dict:
    """The Keras model is its own FP32 reference: its answers on the self-check images, so a machine whose
    TensorFlow kernels answer differently is noticed when the model is loaded there (cxr_edge.self_check)."""
    from ..cpu_isa import isa_name
    from ..self_check import make_record, reference_batch

    probs = model.predict(reference_batch(spec.input_shape), verbose=0)
    return make_record(spec.input_shape, probs, probs, 0.0, "the Keras model (TensorFlow, CPU)", f"keras/{isa_name()}")
