"""Training: the three published Keras recipes, on tf.data, with manifests. Needs the ``train`` extra."""
