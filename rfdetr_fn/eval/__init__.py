"""Evaluation: COCO mAP (`coco`), the macro-F1 sweep (`f1`), keypoint OKS (`keypoints`), detections as
columns (`detections`), inference on raw images (`inference`) and the evaluation loop (`loop`)."""
