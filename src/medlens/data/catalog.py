"""The MedMNIST+ catalogue (v3, Zenodo record 10519652): 12 2D and 6 3D datasets.

Each entry gives the task type, the class names, the official split sizes and the MD5 of
the ``.npz`` at every published size (28 px is the file without a size suffix). 2D datasets
ship at 28/64/128/224 px, 3D datasets at 28/64 voxels. MD5s are those that the ``medmnist``
3.0.2 package records (``INFO[name]["MD5"]``, ``["MD5_64"]``...).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from medlens.errors import DataError
from medlens.utils import did_you_mean

ZENODO_RECORD = "10519652"
ZENODO_URL = f"https://zenodo.org/records/{ZENODO_RECORD}/files/{{file}}?download=1"

# Task types, as medlens names them.
BINARY = "binary"
MULTICLASS = "multiclass"
ORDINAL = "ordinal"
MULTILABEL = "multilabel"
TASKS = (BINARY, MULTICLASS, ORDINAL, MULTILABEL)

_ORGANS = ["bladder", "femur-left", "femur-right", "heart", "kidney-left", "kidney-right",
           "liver", "lung-left", "lung-right", "pancreas", "spleen"]


@dataclass(frozen=True)
class MedMNISTInfo:
    """One MedMNIST dataset: what it is and how to check its files."""

    name: str
    task: str
    labels: tuple[str, ...]
    n_channels: int
    n_samples: dict[str, int]
    md5: dict[int, str]
    dims: int = 2
    description: str = ""
    license: str = "CC BY 4.0"
    sizes: tuple[int, ...] = field(default=(28, 64, 128, 224))

    @property
    def n_classes(self) -> int:
        return len(self.labels)

    def filename(self, size: int = 28) -> str:
        return f"{self.name}.npz" if size == 28 else f"{self.name}_{size}.npz"

    def url(self, size: int = 28) -> str:
        return ZENODO_URL.format(file=self.filename(size))


def _i(name, task, labels, ch, ntr, nva, nte, md5s, dims=2, desc="", lic="CC BY 4.0"):
    sizes = (28, 64, 128, 224) if dims == 2 else (28, 64)
    return MedMNISTInfo(name=name, task=task, labels=tuple(labels), n_channels=ch,
                        n_samples={"train": ntr, "val": nva, "test": nte},
                        md5=dict(zip(sizes, md5s)), dims=dims, description=desc, license=lic, sizes=sizes)


MEDMNIST: dict[str, MedMNISTInfo] = {i.name: i for i in [
    _i("pathmnist", MULTICLASS, ["adipose", "background", "debris", "lymphocytes", "mucus", "smooth muscle",
                                 "normal colon mucosa", "cancer-associated stroma",
                                 "colorectal adenocarcinoma epithelium"], 3, 89996, 10004, 7180,
       ["a8b06965200029087d5bd730944a56c1", "55aa9c1e0525abe5a6b9d8343a507616",
        "ac42d08fb904d92c244187169d1fd1d9", "2c51a510bcdc9cf8ddb2af93af1eadec"],
       desc="Colorectal cancer histology patches (NCT-CRC-HE-100K / CRC-VAL-HE-7K), 9 tissue types."),
    _i("chestmnist", MULTILABEL, ["atelectasis", "cardiomegaly", "effusion", "infiltration", "mass", "nodule",
                                  "pneumonia", "pneumothorax", "consolidation", "edema", "emphysema", "fibrosis",
                                  "pleural", "hernia"], 1, 78468, 11219, 22433,
       ["02c8a6516a18b556561a56cbdd36c4a8", "9de6cd0b934ebb5b7426cfba5efbae16",
        "db107e5590b27930b62dbaf558aebee3", "45bd33e6f06c3e8cdb481c74a89152aa"],
       desc="NIH ChestX-ray14, 14 text-mined findings, multi-label."),
    _i("dermamnist", MULTICLASS, ["actinic keratoses and intraepithelial carcinoma", "basal cell carcinoma",
                                  "benign keratosis-like lesions", "dermatofibroma", "melanoma",
                                  "melanocytic nevi", "vascular lesions"], 3, 7007, 1003, 2005,
       ["0744692d530f8e62ec473284d019b0c7", "b70a2f5635c6199aeaa28c31d7202e1f",
        "2defd784463fa5243564e855ed717de1", "8974907d8e169bef5f5b96bc506ae45d"],
       desc="HAM10000 dermatoscopy, 7 diagnoses.", lic="CC BY-NC 4.0"),
    _i("octmnist", MULTICLASS, ["choroidal neovascularization", "diabetic macular edema", "drusen", "normal"],
       1, 97477, 10832, 1000,
       ["c68d92d5b585d8d81f7112f81e2d0842", "e229e9440236b774d9f0dfef9d07bdaf",
        "0a97e76651ace45c5d943ee3f65b63ae", "abc493b6d529d5de7569faaef2773ba3"],
       desc="Retinal OCT, 4 diagnoses."),
    _i("pneumoniamnist", BINARY, ["normal", "pneumonia"], 1, 4708, 524, 624,
       ["28209eda62fecd6e6a2d98b1501bb15f", "8f4eceb4ccffa70c672198ea285246c6",
        "05b46931834c231683c68f40c47b2971", "d6a3c71de1b945ea11211b03746c1fe1"],
       desc="Paediatric chest X-ray (Kermany et al. 2018), pneumonia vs normal."),
    _i("retinamnist", ORDINAL, ["0", "1", "2", "3", "4"], 3, 1080, 120, 400,
       ["bd4c0672f1bba3e3a89f0e4e876791e4", "afda852cc34dcda56f86ad2b2457dbcc",
        "e48e916a24454daf90583d4e6efb1a18", "eae7e3b6f3fcbda4ae613ebdcbe35348"],
       desc="DeepDRiD fundus photographs, 5-level diabetic-retinopathy grade (ordinal)."),
    _i("breastmnist", BINARY, ["malignant", "normal, benign"], 1, 546, 78, 156,
       ["750601b1f35ba3300ea97c75c52ff8f6", "742edef2a1fd1524b2efff4bd7ba9364",
        "363e4b3f8d712e9b5de15470a2aaadf1", "b56378a6eefa9fed602bb16d192d4c8b"],
       desc="Breast ultrasound, malignant vs normal/benign."),
    _i("bloodmnist", MULTICLASS, ["basophil", "eosinophil", "erythroblast", "immature granulocytes",
                                  "lymphocyte", "monocyte", "neutrophil", "platelet"], 3, 11959, 1712, 3421,
       ["7053d0359d879ad8a5505303e11de1dc", "2b94928a2ae4916078ca51e05b6b800b",
        "adace1e0ed228fccda1f39692059dd4c", "b718ff6835fcbdb22ba9eacccd7b2601"],
       desc="Blood cell microscopy, 8 cell types."),
    _i("tissuemnist", MULTICLASS, ["Collecting Duct, Connecting Tubule", "Distal Convoluted Tubule",
                                   "Glomerular endothelial cells", "Interstitial endothelial cells", "Leukocytes",
                                   "Podocytes", "Proximal Tubule Segments", "Thick Ascending Limb"],
       1, 165466, 23640, 47280,
       ["ebe78ee8b05294063de985d821c1c34b", "123ece2eba09d0aa5d698fda57103344",
        "61b955355d7425a89687b06cca3ce0c2", "b077128c4a949f0a4eb01517f9037b9c"],
       desc="Kidney cortex cells (BBBC051), 8 types."),
    _i("organamnist", MULTICLASS, _ORGANS, 1, 34561, 6491, 17778,
       ["68e3f8846a6bd62f0c9bf841c0d9eacc", "2dcccc29b88e6da5a01161ef20cda288",
        "eeae80d0a227a8d099027e1b3cfd3b60", "50747347e05c87dd3aaf92c49f9f3170"],
       desc="Abdominal CT (LiTS), axial organ patches, 11 organs."),
    _i("organcmnist", MULTICLASS, _ORGANS, 1, 12975, 2392, 8216,
       ["b9ceb9546e10131b32923c5bbeaea2b1", "3ce34a8724ea6f548e6db4744d03b6a9",
        "773c1f009daa3fe5d9a2a201b2a7ed94", "050f5e875dc056f6768abf94ec9995d1"],
       desc="Abdominal CT (LiTS), coronal organ patches, 11 organs."),
    _i("organsmnist", MULTICLASS, _ORGANS, 1, 13932, 2452, 8827,
       ["9ab87b696fb54e2a387ebe992d6ed5f1", "53a6d115339d874c25e309a994ff46d3",
        "ded0c5fa01a95dc4978b956f613e9b8e", "b354719e553fbbb2513d5533f52a4cb1"],
       desc="Abdominal CT (LiTS), sagittal organ patches, 11 organs."),
    _i("organmnist3d", MULTICLASS, ["liver", "kidney-right", "kidney-left", "femur-right", "femur-left", "bladder",
                                    "heart", "lung-right", "lung-left", "spleen", "pancreas"], 1, 971, 161, 610,
       ["a0c5a1ff56af4f155c46d46fbb45a2fe", "58a2205adf14a9d0a189cb06dc78bf10"], dims=3,
       desc="Abdominal CT organ volumes, 11 organs."),
    _i("nodulemnist3d", BINARY, ["benign", "malignant"], 1, 1158, 165, 310,
       ["8755a7e9e05a4d9ce80a24c3e7a256f3", "c47c5b7d457bf6332200d2ea6d64ecd8"], dims=3,
       desc="LIDC-IDRI lung nodules at 1 mm, malignancy 1-2 vs 4-5."),
    _i("adrenalmnist3d", BINARY, ["normal", "hyperplasia"], 1, 1188, 98, 298,
       ["bbd3c5a5576322bc4cdfea780653b1ce", "17721accfe9fb005146a47d33bc54b2f"], dims=3,
       desc="Adrenal gland shape masks from abdominal CT, normal vs mass (patient-level split)."),
    _i("fracturemnist3d", MULTICLASS, ["buckle rib fracture", "nondisplaced rib fracture",
                                       "displaced rib fracture"], 1, 1027, 103, 240,
       ["6aa7b0143a6b42da40027a9dda61302f", "f01d7e6316aedf4210da0da5b7437b42"], dims=3,
       desc="RibFrac CT, 3 fracture types."),
    _i("vesselmnist3d", BINARY, ["vessel", "aneurysm"], 1, 1335, 191, 382,
       ["b41fd4f7e7e2feedddb201585ecafa1b", "6bb274a8846e1097066dcd64e2c4520f"], dims=3,
       desc="IntrA brain vessel segments, healthy vs aneurysm."),
    _i("synapsemnist3d", BINARY, ["inhibitory synapse", "excitatory synapse"], 1, 1230, 177, 352,
       ["1235b78a3cd6280881dd7850a78eadb6", "43bd14ebf3af9d3dd072446fedc14d5e"], dims=3,
       desc="Electron microscopy synapses, excitatory vs inhibitory."),
]}

def get_info(name: str) -> MedMNISTInfo:
    key = name.lower().replace("_", "").replace("-", "")
    if key not in MEDMNIST:
        raise DataError(f"unknown MedMNIST dataset '{name}'{did_you_mean(key, MEDMNIST)}; see `medlens data list`")
    return MEDMNIST[key]


#: DICOM modality of each MedMNIST source (for the run's input profile: a CT slice given to a chest X-ray
#: model is flagged). SM: microscopy; OP: fundus photography; OPT: optical coherence tomography; XC:
#: dermatoscopy photographs; vesselmnist3d is MRA; synapsemnist3d is electron microscopy (no DICOM tag).
MEDMNIST_MODALITY: dict[str, str | None] = {
    "pathmnist": "SM", "chestmnist": "DX", "dermamnist": "XC", "octmnist": "OPT", "pneumoniamnist": "DX",
    "retinamnist": "OP", "breastmnist": "US", "bloodmnist": "SM", "tissuemnist": "SM", "organamnist": "CT",
    "organcmnist": "CT", "organsmnist": "CT", "organmnist3d": "CT", "nodulemnist3d": "CT", "adrenalmnist3d": "CT",
    "fracturemnist3d": "CT", "vesselmnist3d": "MR", "synapsemnist3d": None,
}
