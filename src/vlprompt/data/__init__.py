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

__all__ = [
    "IMAGE_EXTENSIONS",
    "BadSamples",
    "DATASET_FORMATS",
    "GalleryImages",
    "ImageFolderDataset",
    "ImageTextPairs",
    "RetrievalGallery",
    "collate_skip_none",
    "load_gallery",
    "load_image",
    "read_annotations",
]
