"""CenterNet detection utilities: target encoding, loss, decoding and box helpers."""

from jaxcomp.detection.boxes import clip_boxes, iou, yxyx_to_xywh
from jaxcomp.detection.decode import decode_detections
from jaxcomp.detection.loss import detection_loss, focal_loss, regression_l1
from jaxcomp.detection.targets import encode_batch_targets, encode_targets, gaussian_radius

__all__ = [
    "clip_boxes",
    "decode_detections",
    "detection_loss",
    "encode_batch_targets",
    "encode_targets",
    "focal_loss",
    "gaussian_radius",
    "iou",
    "regression_l1",
    "yxyx_to_xywh",
]
