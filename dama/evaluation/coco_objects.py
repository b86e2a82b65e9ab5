"""The 80 COCO object categories and the words a response may use for each, for CHAIR's word matching.

`COCO_SYNONYMS` maps each category name, spelled exactly as in COCO's instances files ("dining table", "tv",
"hair drier"), to the singular words and phrases that name it, the category name first. Plurals are not listed:
`plural` derives them (regular rules plus `IRREGULAR_PLURALS`). The list was written for this project from the
category names and everyday English; like every rule-based matcher it misses rare words and cannot tell senses
apart ("orange" the colour counts as the fruit, "bat" the animal as the baseball bat, "no dog" as a dog).

`NOT_OBJECTS` lists phrases that contain an object's word but name something else ("train track", "ski lift",
"flower bed"): matched as a whole, they hide the object word inside them. A word of `YOUNG_AND_OLD` in front of one
of `ANIMALS` still names that animal ("baby elephant" is an elephant, not a person).
"""

from __future__ import annotations

COCO_SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": ("person", "man", "woman", "boy", "girl", "child", "kid", "baby", "toddler", "teenager", "adult",
               "guy", "lady", "gentleman", "player", "skier", "surfer", "skateboarder", "snowboarder", "rider",
               "pedestrian", "tourist", "spectator", "passenger", "cyclist", "biker", "batter", "catcher", "umpire",
               "chef", "worker", "officer", "policeman", "police officer", "soldier", "student", "crowd"),
    "bicycle": ("bicycle", "bike", "bmx"),
    "car": ("car", "automobile", "sedan", "taxi", "cab", "suv", "jeep", "van", "minivan", "coupe"),
    "motorcycle": ("motorcycle", "motorbike", "motor bike", "dirt bike", "scooter", "moped"),
    "airplane": ("airplane", "aeroplane", "plane", "jet", "jetliner", "airliner", "aircraft", "passenger jet"),
    "bus": ("bus", "minibus", "school bus", "double decker", "coach bus"),
    "train": ("train", "locomotive", "tram", "streetcar", "subway train", "passenger train"),
    "truck": ("truck", "pickup", "pickup truck", "lorry", "fire truck", "firetruck", "dump truck", "semi truck"),
    "boat": ("boat", "ship", "sailboat", "yacht", "canoe", "kayak", "ferry", "raft", "rowboat", "speedboat",
             "motorboat"),
    "traffic light": ("traffic light", "traffic signal", "stoplight", "stop light"),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "park bench"),
    "bird": ("bird", "pigeon", "seagull", "gull", "duck", "goose", "parrot", "sparrow", "eagle", "hawk", "owl",
             "swan", "crow", "pelican", "flamingo", "chicken", "hen", "rooster"),
    "cat": ("cat", "kitten", "kitty"),
    "dog": ("dog", "puppy", "pup", "terrier", "poodle", "bulldog", "retriever", "beagle"),
    "horse": ("horse", "pony", "foal", "stallion", "mare"),
    "sheep": ("sheep", "lamb", "ewe"),
    "cow": ("cow", "cattle", "bull", "calf", "ox", "heifer"),
    "elephant": ("elephant",),
    "bear": ("bear", "grizzly", "polar bear", "brown bear", "black bear"),
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "back pack", "knapsack", "rucksack"),
    "umbrella": ("umbrella", "parasol"),
    "handbag": ("handbag", "hand bag", "purse"),
    "tie": ("tie", "necktie", "bow tie", "bowtie"),
    "suitcase": ("suitcase", "luggage"),
    "frisbee": ("frisbee", "flying disc"),
    "skis": ("skis", "ski"),
    "snowboard": ("snowboard",),
    "sports ball": ("sports ball", "ball", "soccer ball", "tennis ball", "beach ball", "golf ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),
    "baseball glove": ("baseball glove", "glove", "baseball mitt", "mitt"),
    "skateboard": ("skateboard", "skate board", "longboard"),
    "surfboard": ("surfboard", "surf board"),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),
    "bottle": ("bottle",),
    "wine glass": ("wine glass", "wineglass"),
    "cup": ("cup", "mug", "teacup", "coffee cup"),
    "fork": ("fork",),
    "knife": ("knife",),
    "spoon": ("spoon",),
    "bowl": ("bowl",),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "hamburger", "cheeseburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog", "frankfurter"),
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut"),
    "cake": ("cake", "cupcake", "cheesecake"),
    "chair": ("chair", "armchair", "stool", "highchair", "high chair"),
    "couch": ("couch", "sofa", "loveseat", "love seat"),
    "potted plant": ("potted plant", "plant", "houseplant", "house plant", "flowerpot", "flower pot", "planter"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "kitchen table", "coffee table", "picnic table", "desk"),
    "toilet": ("toilet", "toilet seat", "urinal"),
    "tv": ("tv", "television", "tv set", "monitor", "computer monitor"),
    "laptop": ("laptop", "laptop computer", "computer", "macbook"),
    "mouse": ("mouse", "computer mouse"),
    "remote": ("remote", "remote control", "controller"),
    "keyboard": ("keyboard", "computer keyboard"),
    "cell phone": ("cell phone", "cellphone", "phone", "mobile phone", "smartphone", "smart phone", "iphone"),
    "microwave": ("microwave", "microwave oven"),
    "oven": ("oven", "stove", "stovetop"),
    "toaster": ("toaster", "toaster oven"),
    "sink": ("sink", "washbasin"),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book", "novel", "textbook", "paperback"),
    "clock": ("clock", "alarm clock", "wall clock"),
    "vase": ("vase",),
    "scissors": ("scissors", "shears"),
    "teddy bear": ("teddy bear", "teddy", "teddybear", "stuffed animal", "stuffed bear"),
    "hair drier": ("hair drier", "hair dryer", "hairdryer", "blow dryer", "blow drier"),
    "toothbrush": ("toothbrush", "tooth brush"),
}

# Singular -> plural where the regular rules get it wrong (or where a word is its own plural).
IRREGULAR_PLURALS: dict[str, str] = {
    "person": "people",
    "man": "men",
    "woman": "women",
    "gentleman": "gentlemen",
    "policeman": "policemen",
    "child": "children",
    "mouse": "mice",
    "knife": "knives",
    "goose": "geese",
    "ox": "oxen",
    "calf": "calves",
    "sheep": "sheep",
    "cattle": "cattle",
    "skis": "skis",
    "scissors": "scissors",
    "shears": "shears",
    "luggage": "luggage",
    "broccoli": "broccoli",
}

NOT_OBJECTS: tuple[str, ...] = (
    "train track", "train station", "train platform",
    "ski lift", "ski slope", "ski pole", "ski resort", "ski run", "ski boot", "ski jacket",
    "flower bed", "river bed", "bus stop", "bus station", "car park", "baby carriage", "baby stroller",
    "table tennis",
)

YOUNG_AND_OLD: tuple[str, ...] = ("baby", "adult", "young", "mother")
ANIMALS: tuple[str, ...] = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")


def plural(phrase: str) -> str:
    """The plural of a singular noun or noun phrase (its last word is made plural): "hot dog" -> "hot dogs"."""
    *head, last = phrase.split(" ")
    if last in IRREGULAR_PLURALS:
        last = IRREGULAR_PLURALS[last]
    elif last.endswith(("s", "x", "z", "ch", "sh")):
        last += "es"
    elif last.endswith("y") and len(last) > 1 and last[-2] not in "aeiou":
        last = last[:-1] + "ies"
    else:
        last += "s"
    return " ".join([*head, last])
