"""ResNet18 image classification: preprocessing, labels and the model. No asyncio, no HTTP.

Another model or task takes this package's place in ``service/core.py``, ``main.py`` and the
response models of ``service/schemas.py`` (reusing its image decoding, errors and device
helpers; README.md, "Another model or task", lists the rest); the batching side only sees a
function that maps a list of inputs to a list of outputs.
"""

from classification.model import (
    DTYPES,
    Classifier,
    DeviceFailed,
    ModelLoadError,
    OutOfMemory,
    Prediction,
    build_network,
    cpu_computes_bfloat16,
    fold_batchnorm,
    is_out_of_memory,
    load_classifier,
    load_labels,
    resolve_device,
)
from classification.preprocess import (
    ImageTooLarge,
    InvalidImage,
    decode_image,
    normalize_batch,
    preprocess,
)

__all__ = [
    "DTYPES",
    "Classifier",
    "DeviceFailed",
    "ImageTooLarge",
    "InvalidImage",
    "ModelLoadError",
    "OutOfMemory",
    "Prediction",
    "build_network",
    "cpu_computes_bfloat16",
    "decode_image",
    "fold_batchnorm",
    "is_out_of_memory",
    "load_classifier",
    "load_labels",
    "normalize_batch",
    "preprocess",
    "resolve_device",
]
