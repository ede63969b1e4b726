"""The annotation formats vlprompt reads, with what they are for (``vlprompt list datasets``)."""

DATASET_FORMATS: dict[str, str] = {
    "karpathy": "Karpathy/ALBEF JSON image-text retrieval (COCO, Flickr30K); data.root = image root",
    "imagefolder": "ImageFolder-style classification trees: root/<class>/<image>",
    "world": "the embedded offline world (`vlprompt world build`), written in the formats above",
}
