"""The annotation formats vlprompt reads, with what they are for (``vlprompt list datasets``)."""

DATASET_FORMATS: dict[str, str] = {
    "karpathy": "Karpathy/ALBEF JSON image-text retrieval (COCO, Flickr30K); data.root = image root",
    "imagefolder": "ImageFolder-style classification trees: root/<class>/<image>",
    "msrvtt": "MSR-VTT, CLIP4Clip layout: MSRVTT_train.9k.csv + MSRVTT_data.json, MSRVTT_JSFUSION_test.csv",
    "vatex": "VATEX: ref_captions.json + {train,test}_list.txt (multi-sentence)",
    "lsmdc": "LSMDC16 tab-separated annotations (+ optional video_path.json)",
    "activitynet": "ActivityNet Captions as paragraphs: {train,val}_ids.json + train.json / val_1.json",
    "msvd": "MSVD: raw-captions.pkl + {train,val,test}_list.txt (multi-sentence)",
    "didemo": "DiDeMo as paragraphs: {split}_data.json (+ {split}_list.txt)",
    # referring expressions (RefCOCO/+/g; readers in vlprompt.data.grounding, runs in vlprompt.runners.grounding)
    "mdetr-refexp": "RefCOCO/+/g as MDETR's finetune_<refcoco|refcoco+|refcocog>_<split>.json (COCO train2014 images)",
    "refer": "RefCOCO/+/g in the refer toolkit layout: <dataset>/refs(unc|google|umd).p + instances.json",
    # captioning (`vlprompt caption`; readers in vlprompt.data.captions)
    "nocaps": "nocaps validation / COCO-caption JSON ({images: [{id, file_name, domain}], annotations}); "
    "karpathy files work too; data.root = image root",
    "world": "the embedded offline world (`vlprompt world build`), written in the formats above",
    # classification (test-time adaptation: `vlprompt tta`; class-incremental: `vlprompt continual` with cil.*)
    "imagenet": "TTA: ImageNet-1k validation set, val/<wnid>/*.JPEG",
    "imagenet-a": "TTA: ImageNet-A, <wnid>/*.jpg, 200 classes",
    "imagenet-r": "TTA: ImageNet-R, <wnid>/*.jpg, 200 classes; class-incremental: seeded per-class hold-out or "
    "train/ and test/ trees",
    "imagenet-v2": "TTA: ImageNet-V2 matched-frequency, <class index>/*.jpeg",
    "imagenet-sketch": "TTA: ImageNet-Sketch, <wnid>/*.JPEG, 1000 classes",
    "cifar100": "class-incremental: CIFAR-100 python pickles (cifar-100-python/{train,test,meta})",
    "cub200": "class-incremental: CUB_200_2011 (images.txt, train_test_split.txt, image_class_labels.txt) or "
    "train/ and test/ trees",
}
