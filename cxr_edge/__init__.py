"""cxr-edge: an edge inference engine for chest X-ray screening.

The base package (decoding, preprocessing, datasets, the runtime) never imports TensorFlow;
training and export live behind the ``train`` extra and are imported lazily.
"""

__version__ = "0.1.0"
