"""ResNet18 image classification: preprocessing, labels and the model. No asyncio, no HTTP.

Another model or task replaces this package; the batching side only sees a function that
maps a list of inputs to a list of outputs.
"""

from classification.model import (
    Classifier,
    ModelLoadError,
    Prediction,
    build_network,
    load_classifier,
    load_labels,
    resolve_device,
)
from classification.preprocess import (
    ImageTooLarge,
    InvalidImage,
    decode_image,
    preprocess,
    to_model_input,
)

__all__ = [
    "Classifier",
    "ImageTooLarge",
    "InvalidImage",
    "ModelLoadError",
    "Prediction",
    "build_network",
    "decode_image",
    "load_classifier",
    "load_labels",
    "preprocess",
    "resolve_device",
    "to_model_input",
]
