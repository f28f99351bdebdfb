"""Class lists of the real benchmarks and the overlap tables between label sets.

The in-distribution (ID) class lists fix the category ids of every prepared
json (id = 1 + position in the list) and hence the classifier's output order.

The overlap tables say, for each ID class, which classes of another label set
denote the same kind of object. An OOD image must hold none of them. They are
written by hand, reviewed against each dataset's annotation guidelines, and
tested (``tests/test_real_datasets.py``):

- VOC -> COCO: the 20 VOC classes are a subset of COCO's 80 under other names
  (aeroplane = airplane, sofa = couch, ...). COCO "truck" is not VOC "car"
  (VOC's guidelines exclude lorries/trucks from car). Same table as the
  literature's ``instances_val2017_ood_rm_overlap.json`` (VOS).
- BDD -> COCO: pedestrian and rider are COCO persons; BDD "traffic sign"
  covers COCO "stop sign". Same table as the literature's
  ``instances_val2017_ood_wrt_bdd_rm_overlap.json``.
- ID -> OpenImages: OpenImages display names (boxable classes) of whole objects
  of each ID class, including its subclasses in the OpenImages hierarchy (Man,
  Woman, ... for person). A visible face, head or body counts as a person;
  isolated limbs (Human hand, Human leg) do not. Names are compared
  case-insensitively; a name absent from a given release simply never matches.
"""

# Standard PASCAL VOC order (alphabetical), as in detectron2's pascal_voc loader.
# fmt: off
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)

# BDD100K detection classes in the order used by the OOD-detection literature (VOS).
BDD_CLASSES = (
    "pedestrian", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle",
    "traffic light", "traffic sign",
)

# Names of the 2018 BDD100K label release (bdd100k_labels_images_*.json) renamed in the
# 2020 detection release (det_20); identity for the other classes.
BDD_LEGACY_NAMES = {"person": "pedestrian", "bike": "bicycle", "motor": "motorcycle"}

# COCO 2017 detection classes in category-id order (ids 1..90 with gaps).
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat",
    "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "backpack",
    "umbrella", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball",
    "kite", "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket",
    "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair",
    "couch", "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse",
    "remote", "keyboard", "cell phone", "microwave", "oven", "toaster", "sink",
    "refrigerator", "book", "clock", "vase", "scissors", "teddy bear", "hair drier",
    "toothbrush",
)
# fmt: on

VOC_TO_COCO = {
    "aeroplane": ("airplane",),
    "bicycle": ("bicycle",),
    "bird": ("bird",),
    "boat": ("boat",),
    "bottle": ("bottle",),
    "bus": ("bus",),
    "car": ("car",),
    "cat": ("cat",),
    "chair": ("chair",),
    "cow": ("cow",),
    "diningtable": ("dining table",),
    "dog": ("dog",),
    "horse": ("horse",),
    "motorbike": ("motorcycle",),
    "person": ("person",),
    "pottedplant": ("potted plant",),
    "sheep": ("sheep",),
    "sofa": ("couch",),
    "train": ("train",),
    "tvmonitor": ("tv",),
}

BDD_TO_COCO = {
    "pedestrian": ("person",),
    "rider": ("person",),
    "car": ("car",),
    "truck": ("truck",),
    "bus": ("bus",),
    "train": ("train",),
    "motorcycle": ("motorcycle",),
    "bicycle": ("bicycle",),
    "traffic light": ("traffic light",),
    "traffic sign": ("stop sign",),
}

_OI_PERSON = ("Person", "Man", "Woman", "Boy", "Girl", "Human body", "Human face", "Human head")
_OI_CAR = ("Car", "Limousine", "Taxi", "Van")

VOC_TO_OPENIMAGES = {
    "aeroplane": ("Airplane", "Aircraft"),
    "bicycle": ("Bicycle",),
    "bird": (
        "Bird", "Blue jay", "Canary", "Chicken", "Duck", "Eagle", "Falcon", "Goose", "Magpie",
        "Ostrich", "Owl", "Parrot", "Penguin", "Raven", "Sparrow", "Swan", "Turkey", "Woodpecker",
    ),
    "boat": ("Boat", "Barge", "Canoe", "Gondola"),
    "bottle": ("Bottle",),
    "bus": ("Bus",),
    "car": _OI_CAR,
    "cat": ("Cat",),
    "chair": ("Chair",),
    "cow": ("Cattle", "Bull"),
    "diningtable": ("Table", "Kitchen & dining room table"),
    "dog": ("Dog",),
    "horse": ("Horse", "Mule", "Donkey"),
    "motorbike": ("Motorcycle", "Moped"),
    "person": _OI_PERSON,
    "pottedplant": ("Houseplant", "Flowerpot"),
    "sheep": ("Sheep",),
    "sofa": ("Couch", "Sofa bed", "Studio couch"),
    "train": ("Train",),
    "tvmonitor": ("Television", "Computer monitor"),
}

BDD_TO_OPENIMAGES = {
    "pedestrian": _OI_PERSON,
    "rider": _OI_PERSON,
    "car": _OI_CAR,
    "truck": ("Truck",),
    "bus": ("Bus",),
    "train": ("Train",),
    "motorcycle": ("Motorcycle", "Moped"),
    "bicycle": ("Bicycle",),
    "traffic light": ("Traffic light",),
    "traffic sign": ("Traffic sign", "Stop sign"),
}

# In-distribution label sets by short name, with their overlap tables.
ID_CLASSES = {"voc": VOC_CLASSES, "bdd": BDD_CLASSES}
TO_COCO = {"voc": VOC_TO_COCO, "bdd": BDD_TO_COCO}
TO_OPENIMAGES = {"voc": VOC_TO_OPENIMAGES, "bdd": BDD_TO_OPENIMAGES}


def overlap_names(table) -> dict:
    """Invert an overlap table: {lower-cased foreign class name: [ID classes it overlaps]}."""
    out = {}
    for id_class, names in table.items():
        for n in names:
            out.setdefault(n.lower(), []).append(id_class)
    return out


def coco_ood_classes(id_set: str) -> list:
    """COCO classes that may appear in the COCO-OOD set of ``id_set`` ("voc" or "bdd")."""
    overlap = overlap_names(TO_COCO[id_set])
    return [c for c in COCO_CLASSES if c not in overlap]
