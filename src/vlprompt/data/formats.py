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
    "world": "the embedded offline world (`vlprompt world build`), written in the formats above",
}
