"""cxr-edge: an edge inference engine for chest X-ray screening.

The base package (decoding, preprocessing, datasets, the runtime) never imports TensorFlow;
training and export live behind the ``train`` extra and are imported lazily.
"""

__version__ = "0.1.0"

import os as _os

# ONNX Runtime's PyPI builds for Linux carry 1DS telemetry: at first use they create
# ~/.cache/Microsoft/DeveloperTools/.onnxruntime/onnxruntime.db and a ".ses" file in $TMPDIR and queue
# events for upload (found by the fault tests, which run the service with an empty TMPDIR). A screening
# box writes and sends nothing its operator did not ask for, so opt out with ORT's documented switch,
# which only works when set before onnxruntime initialises. Set ORT_DISABLE_TELEMETRY=0 to opt back in.
_os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

# Second line against decompression bombs: OpenCV's own decoders refuse images over this many pixels
# (its default is 2**30, i.e. a 3 GB colour buffer from a few kB of JPEG or TIFF). It only applies when
# set before cv2 is first imported; DecodeLimits.max_pixels (the same 50 MP by default) is checked
# from the headers first. Raise both to accept larger images.
_os.environ.setdefault("OPENCV_IO_MAX_IMAGE_PIXELS", str(50_000_000))
