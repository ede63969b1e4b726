"""Readers for real annotation formats, image decoding, and tolerant batching; knows nothing about models."""

from vlprompt.data.collate import collate_skip_none
from vlprompt.data.formats import DATASET_FORMATS
from vlprompt.data.imagefolder import ImageFolderDataset
from vlprompt.data.karpathy import (
    GalleryImages,
    ImageTextPairs,
    RetrievalGallery,
    load_gallery,
    read_annotations,
)
from vlprompt.data.media import IMAGE_EXTENSIONS, BadSamples, load_image
from vlprompt.data.video import VIDEO_EXTENSIONS, FrameCache, VideoTransform, read_frames, sample_indices
from vlprompt.data.video_datasets import (
    VIDEO_READERS,
    GalleryVideos,
    VideoTextPairs,
    VideoTextSplit,
    read_activitynet,
    read_didemo,
    read_lsmdc,
    read_msrvtt,
    read_msvd,
    read_vatex,
    read_video_split,
)

__all__ = [
    "IMAGE_EXTENSIONS",
    "VIDEO_EXTENSIONS",
    "VIDEO_READERS",
    "BadSamples",
    "DATASET_FORMATS",
    "FrameCache",
    "GalleryImages",
    "GalleryVideos",
    "ImageFolderDataset",
    "ImageTextPairs",
    "RetrievalGallery",
    "VideoTextPairs",
    "VideoTextSplit",
    "VideoTransform",
    "collate_skip_none",
    "load_gallery",
    "load_image",
    "read_activitynet",
    "read_annotations",
    "read_didemo",
    "read_frames",
    "read_lsmdc",
    "read_msrvtt",
    "read_msvd",
    "read_vatex",
    "read_video_split",
    "sample_indices",
]
