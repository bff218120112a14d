"""Model families, registered by name."""

from microsearch.models._convnet import ConvNet, ConvNetConfig
from microsearch.models._ensemble import Ensemble
from microsearch.models._registry import create_model, list_models, model_spec, register_model, same_layers
from microsearch.models._resnet import BLOCKS, STEMS, ResNet, ResNetConfig

__all__ = [
    "BLOCKS",
    "STEMS",
    "ConvNet",
    "ConvNetConfig",
    "Ensemble",
    "ResNet",
    "ResNetConfig",
    "create_model",
    "list_models",
    "model_spec",
    "register_model",
    "same_layers",
]
