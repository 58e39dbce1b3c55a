"""SONICHU data: FM_UIA keypoint layout, synthetic images, augmentations, Grain pipelines."""
