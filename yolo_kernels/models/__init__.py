"""The YOLOv3 model of the seed: Darknet cfg parsing, the network, and the shipped architectures."""

from .cfg import SUPPORTED_FIELDS, format_cfg, parse_cfg_text, parse_model_cfg
from .darknet import Darknet, FeatureConcat, Mish, Swish, WeightedFeatureFusion, YOLOLayer, create_modules
from .zoo import CFG_DIR, SHIPPED, packaged_cfg_names, packaged_cfg_path, shipped_cfg, yolov3, yolov3_spp, yolov3_tiny

__all__ = [
    "SUPPORTED_FIELDS",
    "format_cfg",
    "parse_cfg_text",
    "parse_model_cfg",
    "Darknet",
    "FeatureConcat",
    "Mish",
    "Swish",
    "WeightedFeatureFusion",
    "YOLOLayer",
    "create_modules",
    "CFG_DIR",
    "SHIPPED",
    "packaged_cfg_names",
    "packaged_cfg_path",
    "shipped_cfg",
    "yolov3",
    "yolov3_spp",
    "yolov3_tiny",
]
