"""A site's labelled CT, read from the layouts sites hold it in.

`open_dataset(DIR)` detects the layout of DIR and lists its cases; `CaseRef.load()` reads
one case as a `SiteCase`: the CT in HU on nodal's (slice, row, column) grid with its affine
((k, j, i, 1) -> LPS mm) and a label volume on the same grid (0 background, 1 lymph node,
benign or unknown, 2 malignant lymph node; docs/training.md).

Layouts, tried in this order:

* ``cases.json`` (nodal's own): image and label paths per case, label values 0/1/2.
* nnU-Net v2 raw dataset: ``dataset.json`` (``channel_names``, ``labels``, ``numTraining``,
  ``file_ending``), ``imagesTr/<case>_0000.nii.gz``, ``labelsTr/<case>.nii.gz`` and
  optionally ``imagesTs/``, ``labelsTs/`` (the test split). Label names are mapped to
  nodal's values by `label_mapping`.
* DICOM: a folder tree with CT series and DICOM SEG objects that reference them (as TCIA
  distributes lymph-node annotations). Each SEG is one case; it is paired with its CT by
  Referenced Series Sequence, referenced SOP Instance UIDs or Frame of Reference, and its
  frames are put on the CT grid by their source image references, or by their Image
  Position (Patient) where they have none.

Errors are `DatasetError` (a ValueError) and say what is wrong and what to do.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import numpy as np
from pydicom.uid import SegmentationStorage

from inference.dicom_volume import (
    CT_IMAGE_STORAGE,
    ENHANCED_CT_IMAGE_STORAGE,
    LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE,
)
from inference.volume import Volume

log = logging.getLogger(__name__)

BACKGROUND, NODE, MALIGNANT = 0, 1, 2
NIFTI_ENDINGS = (".nii.gz", ".nii")
SEG_STORAGE = str(SegmentationStorage)
#: Label Map Segmentation Storage (DICOM 2024c); pydicom 3.0 has no name for it yet.
LABEL_MAP_SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.7"
CT_STORAGE = {CT_IMAGE_STORAGE, ENHANCED_CT_IMAGE_STORAGE, LEGACY_CONVERTED_ENHANCED_CT_IMAGE_STORAGE}
#: Segmented Property Type codes of a lymph node: SNOMED CT, and the retired SNOMED RT code.
LYMPH_NODE_CODES = {("59441001", "SCT"), ("T-C4000", "SRT")}
#: Grid agreement of label and image affines, in mm.
GRID_TOLERANCE_MM = 0.01

_MALIGNANT_WORDS = re.compile(r"malignan|metasta|cancer|tumou?r|positive|patholog|suspicious")
_BENIGN_WORDS = re.compile(r"benign|non.?malignan|negative|normal|reactive|unknown|unsure|indeterminate")
_NODE_WORDS = re.compile(r"\bnodes?\b|\blymph|\bln\b|\blns\b|lymphnode|lymph_node")


class DatasetError(ValueError):
    """A dataset folder cannot be read as labelled lymph-node CT."""


@dataclass(frozen=True)
class SiteCase:
    name: str
    hu: np.ndarray = field(repr=False)  # float32 HU, (slice, row, column)
    affine: np.ndarray = field(repr=False)  # (k, j, i, 1) -> LPS mm
    label: np.ndarray = field(repr=False)  # uint8: 0 background, 1 node, 2 malignant node
    volume: Volume | None = field(default=None, repr=False)  # a DICOM CT: the series as loaded

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(np.linalg.norm(self.affine[:3, a])) for a in range(3))  # type: ignore[return-value]

    def as_volume(self) -> Volume:
        """The CT as the pipeline takes it: the loaded series, or the array with UIDs derived
        from the case's name (NIfTI holds none)."""
        if self.volume is not None:
            return self.volume
        from inference.findings import SliceRef
        from inference.uids import deterministic_uid

        series = deterministic_uid("nodal-site-case", self.name, "series")
        return Volume(
            array=self.hu,
            affine=self.affine,
            slices=tuple(
                SliceRef(deterministic_uid(series, str(k)), CT_IMAGE_STORAGE) for k in range(self.hu.shape[0])
            ),
            study_instance_uid=deterministic_uid("nodal-site-case", self.name, "study"),
            series_instance_uid=series,
            frame_of_reference_uid=deterministic_uid("nodal-site-case", self.name, "for"),
        )


@dataclass(frozen=True)
class CaseRef:
    name: str
    split: str  # train | test | verifier
    load: Callable[[], SiteCase] = field(repr=False, compare=False)


@dataclass(frozen=True)
class SiteDataset:
    root: Path
    layout: str  # cases.json | nnunet | dicom-seg
    cases: tuple[CaseRef, ...]

    def split(self, name: str) -> list[CaseRef]:
        return [c for c in self.cases if c.split == name]

    def evaluation_cases(self) -> tuple[str, list[CaseRef]]:
        """The test split where the dataset has one, otherwise its training cases."""
        test = self.split("test")
        return ("test", test) if test else ("train", self.split("train"))


def detect_layout(root: Path) -> str:
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root} is not a folder; pass the dataset folder to --data")
    if (root / "cases.json").is_file():
        return "cases.json"
    if (root / "dataset.json").is_file():
        return "nnunet"
    if (root / "imagesTr").is_dir() or (root / "labelsTr").is_dir():
        raise DatasetError(
            f"{root} has imagesTr/ or labelsTr/ but no dataset.json; an nnU-Net raw dataset needs "
            "its dataset.json (channel_names, labels, numTraining, file_ending)"
        )
    return "dicom-seg"


def open_dataset(root: Path) -> SiteDataset:
    """Detect the layout of `root` and list its cases (nothing is loaded yet)."""
    root = Path(root)
    layout = detect_layout(root)
    reader = {"cases.json": _cases_json, "nnunet": _nnunet, "dicom-seg": _dicom_seg}[layout]
    cases = tuple(reader(root))
    if not cases:
        raise DatasetError(f"{root} ({layout} layout) holds no labelled case")
    return SiteDataset(root=root, layout=layout, cases=cases)


# --- NIfTI -----------------------------------------------------------------------------------


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A NIfTI image as nodal's (slice, row, column) array and its (k, j, i) -> LPS affine.

    NIfTI arrays are (x, y, z) with an affine to RAS; nodal's order is their transpose, and
    LPS flips the first two patient axes.
    """
    import nibabel as nib
    from nibabel.spatialimages import SpatialImage

    img = cast(SpatialImage, nib.load(str(path)))  # NIfTI images are spatial images
    data = np.asanyarray(img.dataobj)
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DatasetError(f"{Path(path).name}: a 3D image is needed, it has shape {data.shape}")
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ np.asarray(img.affine, float)
    affine = np.eye(4)
    affine[:3, :3] = lps[:3, 2::-1]  # columns (k, j, i)
    affine[:3, 3] = lps[:3, 3]
    return np.transpose(data, (2, 1, 0)), affine


def check_same_grid(what: str, label_shape, label_affine, image_shape, image_affine) -> None:
    if tuple(label_shape) != tuple(image_shape):
        raise DatasetError(
            f"{what}: the label has shape {tuple(label_shape)} (slice, row, column), the image "
            f"{tuple(image_shape)}; a label must lie on its image's voxel grid"
        )
    same = label_affine is None or np.allclose(label_affine, image_affine, atol=GRID_TOLERANCE_MM, rtol=0)
    if not same:
        raise DatasetError(
            f"{what}: the label's voxel grid (origin, spacing or orientation) differs from the "
            "image's; resample the label onto the image grid (nearest neighbour) first"
        )


# --- cases.json ------------------------------------------------------------------------------


def _cases_json(root: Path) -> list[CaseRef]:
    try:
        listing = json.loads((root / "cases.json").read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"{root / 'cases.json'} is not valid JSON: {e}") from None
    out = []
    for key, split in (("cases", "train"), ("test_cases", "test"), ("verifier_cases", "verifier")):
        for n, c in enumerate(listing.get(key) or []):
            if not {"image", "label"} <= set(c):
                raise DatasetError(f"cases.json: {key}[{n}] needs an 'image' and a 'label'")
            image, label = root / c["image"], root / c["label"]
            out.append(CaseRef(f"{key}[{n}]", split, _bind(read_listed_case, f"{key}[{n}]", image, label)))
    return out


def _bind(fn, *args):
    return lambda: fn(*args)


def read_listed_case(name: str, image_path: Path, label_path: Path) -> SiteCase:
    """A case of cases.json: a NIfTI CT or a DICOM series folder, and a NIfTI label (0/1/2)."""
    image_path, label_path = Path(image_path), Path(label_path)
    for p in (image_path, label_path):
        if not p.exists():
            raise DatasetError(f"cases.json, {name}: {p.name} does not exist")
    lab, nifti_affine = read_nifti(label_path)
    lab_affine: np.ndarray | None = nifti_affine
    volume = None
    if image_path.is_dir():
        from inference.dicom_volume import load_series

        volume = load_series(image_path)
        hu, affine = volume.array, volume.affine
        if lab.shape != hu.shape and lab.shape[::-1] == hu.shape:  # written without the transpose
            lab = np.transpose(lab, (2, 1, 0))
        lab_affine = None  # a label NIfTI beside a DICOM folder is matched by its shape only
    else:
        hu, affine = read_nifti(image_path)
    check_same_grid(f"cases.json, {name}", lab.shape, lab_affine, hu.shape, affine)
    values = set(np.unique(lab).tolist())
    if not values <= {0, 1, 2}:
        raise DatasetError(
            f"cases.json, {name}: label values {sorted(values - {0, 1, 2})} are not nodal's "
            "(0 background, 1 lymph node, 2 malignant lymph node)"
        )
    return SiteCase(name, hu.astype(np.float32), affine, lab.astype(np.uint8), volume)


# --- nnU-Net ---------------------------------------------------------------------------------


def _words(name: str) -> str:
    return re.sub(r"[\s_\-]+", " ", name.strip().lower())


def nodal_value(label_name: str) -> int | None:
    """nodal's value for an nnU-Net label name, or None when the name says neither.

    A name must speak of a node ("lymph node", "LN", "malignant node"), except the bare
    words malignant, metastatic, positive (2) and benign, unknown (1); "tumour" or
    "metastasis" alone may be anything and is refused."""
    w = _words(label_name)
    if w in ("background", "bg", "none"):
        return BACKGROUND
    if w in ("malignant", "metastatic", "positive"):
        return MALIGNANT
    if w in ("benign", "unknown"):
        return NODE
    if not _NODE_WORDS.search(w):
        return None
    if _BENIGN_WORDS.search(w):
        return NODE
    return MALIGNANT if _MALIGNANT_WORDS.search(w) else NODE


def label_mapping(labels: dict, overrides: dict | None = None) -> dict[int, int]:
    """Dataset label value -> nodal value, from dataset.json's ``labels`` (name -> value).

    ``overrides`` (dataset.json's ``nodal_labels``, name -> 0, 1 or 2) names what the
    rules cannot tell. A name that is neither background, a lymph node nor a malignant
    lymph node is refused.
    """
    overrides = overrides or {}
    out, unknown = {}, []
    for name, value in labels.items():
        if isinstance(value, list | tuple):
            raise DatasetError(
                f"dataset.json: label {name!r} is a region ({value}); nodal reads one value per label"
            )
        if name in overrides:
            mapped = overrides[name]
            if mapped not in (0, 1, 2):
                raise DatasetError(f"dataset.json: nodal_labels[{name!r}] must be 0, 1 or 2, not {mapped!r}")
        else:
            mapped = nodal_value(name)
        if mapped is None:
            unknown.append(name)
        else:
            out[int(value)] = int(mapped)
    if unknown:
        raise DatasetError(
            f"dataset.json: nodal cannot tell what the label(s) {unknown} are. It reads background, "
            "lymph node (benign or unknown) and malignant lymph node, by name (e.g. 'background', "
            "'lymph node', 'malignant lymph node'); name the others in dataset.json as "
            '"nodal_labels": {"<name>": 0, 1 or 2} (0 also ignores a structure)'
        )
    if out.get(0, 0) != BACKGROUND:
        raise DatasetError("dataset.json: label value 0 must be the background")
    out.setdefault(0, BACKGROUND)
    return out


def _nnunet(root: Path) -> list[CaseRef]:
    try:
        meta = json.loads((root / "dataset.json").read_text())
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset.json is not valid JSON: {e}") from None
    for key in ("labels", "file_ending"):
        if key not in meta:
            raise DatasetError(f"dataset.json has no {key!r}; nodal reads nnU-Net v2 raw datasets")
    ending = meta["file_ending"]
    if ending not in NIFTI_ENDINGS:
        raise DatasetError(f"dataset.json: file_ending {ending!r}; nodal reads NIfTI (.nii.gz or .nii)")
    channels = meta.get("channel_names") or meta.get("modality") or {}
    if len(channels) != 1 or "ct" not in str(next(iter(channels.values()))).lower():
        raise DatasetError(f"dataset.json: channel_names {channels}; nodal reads datasets of one CT channel")
    mapping = label_mapping(meta["labels"], meta.get("nodal_labels"))
    out = []
    for split, images, labels in (("train", "imagesTr", "labelsTr"), ("test", "imagesTs", "labelsTs")):
        if not (root / labels).is_dir():
            if split == "train":
                raise DatasetError(f"{root} has no labelsTr/ folder")
            continue
        for lab in sorted((root / labels).glob(f"*{ending}")):
            case = lab.name[: -len(ending)]
            image = root / images / f"{case}_0000{ending}"
            if not image.is_file():
                raise DatasetError(f"{labels}/{lab.name} has no image {images}/{image.name}")
            out.append(CaseRef(case, split, _bind(read_nnunet_case, case, image, lab, mapping)))
    trained = sum(c.split == "train" for c in out)
    if "numTraining" in meta and int(meta["numTraining"]) != trained:
        raise DatasetError(f"dataset.json says numTraining {meta['numTraining']}, labelsTr/ holds {trained}")
    return out


def read_nnunet_case(name: str, image_path: Path, label_path: Path, mapping: dict[int, int]) -> SiteCase:
    hu, affine = read_nifti(image_path)
    lab, lab_affine = read_nifti(label_path)
    check_same_grid(f"case {name}", lab.shape, lab_affine, hu.shape, affine)
    values = np.unique(lab)
    if not np.all(np.equal(np.mod(values, 1), 0)) or values.min() < 0:
        raise DatasetError(f"case {name}: label values must be non-negative integers")
    missing = sorted(set(values.astype(int).tolist()) - set(mapping))
    if missing:
        raise DatasetError(f"case {name}: label values {missing} are not among dataset.json's labels")
    lut = np.zeros(int(values.max()) + 1, np.uint8)
    for value, mapped in mapping.items():
        if value < lut.size:
            lut[value] = mapped
    return SiteCase(name, hu.astype(np.float32), affine, lut[lab.astype(np.int64)])


# --- DICOM SEG -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Series:
    paths: list[Path]
    frame_of_reference: str
    sop_instance_uids: set[str]


def _dicom_files(root: Path) -> list[Path]:
    from inference.dicom_volume import _is_dicom_file

    return [p for p in sorted(root.rglob("*")) if p.is_file() and _is_dicom_file(p)]


def _dicom_seg(root: Path) -> list[CaseRef]:
    import pydicom

    segs: list[tuple[Path, pydicom.dataset.FileDataset]] = []
    series: dict[str, _Series] = {}
    for p in _dicom_files(root):
        try:
            ds = pydicom.dcmread(p, stop_before_pixels=True)
        except Exception:  # unreadable files are not part of any case
            continue
        sop_class = str(ds.get("SOPClassUID", ""))
        if sop_class in (SEG_STORAGE, LABEL_MAP_SEG_STORAGE):
            segs.append((p, ds))
        elif sop_class in CT_STORAGE:
            uid = str(ds.get("SeriesInstanceUID", ""))
            s = series.setdefault(uid, _Series([], str(ds.get("FrameOfReferenceUID", "")), set()))
            s.paths.append(p)
            s.sop_instance_uids.add(str(ds.SOPInstanceUID))
    if not segs:
        raise DatasetError(
            f"{root}: no cases.json, no dataset.json and no DICOM SEG object under it; nodal reads "
            "cases.json, an nnU-Net raw dataset, or CT series with DICOM SEG labels (docs/training.md)"
        )
    out = []
    for n, (path, ds) in enumerate(segs, start=1):
        uid = _paired_series(ds, series, n)
        name = f"seg-{n:03d}"
        out.append(CaseRef(name, "train", _bind(read_seg_case, name, path, series[uid].paths)))
    return out


def _referenced_instances(seg) -> set[str]:
    uids = {
        str(i.ReferencedSOPInstanceUID)
        for s in seg.get("ReferencedSeriesSequence", [])
        for i in s.get("ReferencedInstanceSequence", [])
    }
    for frame in seg.get("PerFrameFunctionalGroupsSequence", []):
        for der in frame.get("DerivationImageSequence", []):
            uids.update(str(src.ReferencedSOPInstanceUID) for src in der.get("SourceImageSequence", []))
    return uids


def _paired_series(seg, series: dict[str, _Series], n: int) -> str:
    """The CT series that SEG #n labels: by Referenced Series Sequence, then by referenced
    SOP Instance UIDs, then by Frame of Reference (when exactly one CT series shares it)."""
    refs = [str(s.SeriesInstanceUID) for s in seg.get("ReferencedSeriesSequence", [])]
    found = [u for u in refs if u in series]
    if not found:
        instances = _referenced_instances(seg)
        found = [u for u, s in series.items() if instances & s.sop_instance_uids]
    for_uid = str(seg.get("FrameOfReferenceUID", ""))
    if not found and not refs:
        found = [u for u, s in series.items() if for_uid and s.frame_of_reference == for_uid]
        if len(found) > 1:
            raise DatasetError(
                f"SEG #{n} names no source series and {len(found)} CT series share its frame of "
                "reference; keep one CT series per SEG in the folder"
            )
    if not found:
        raise DatasetError(
            f"SEG #{n} (in name order) labels CT series {refs or '(not named)'}, which is not under "
            "the folder; put the SEG beside the CT series it was drawn on"
        )
    uid = found[0]
    if for_uid and series[uid].frame_of_reference and series[uid].frame_of_reference != for_uid:
        raise DatasetError(f"SEG #{n} has another frame of reference than the CT series it references")
    return uid


def _code_key(item) -> tuple[str, str]:
    return str(item.get("CodeValue", "")), str(item.get("CodingSchemeDesignator", ""))


def segment_kind(desc) -> int | None:
    """nodal's value for one Segment Sequence item: NODE, MALIGNANT, or None (not a node)."""
    types = list(desc.get("SegmentedPropertyTypeCodeSequence", []))
    meanings = [str(t.get("CodeMeaning", "")) for t in types]
    for t in types:
        modifiers = t.get("SegmentedPropertyTypeModifierCodeSequence", [])
        meanings += [str(m.get("CodeMeaning", "")) for m in modifiers]
    label = str(desc.get("SegmentLabel", "")) + " " + str(desc.get("SegmentDescription", ""))
    is_node = any(_code_key(t) in LYMPH_NODE_CODES for t in types) or any(
        _NODE_WORDS.search(_words(m)) for m in meanings
    )
    if not is_node and not _NODE_WORDS.search(_words(label)):
        return None
    text = _words(" ".join([label, *meanings]))
    if _BENIGN_WORDS.search(text):
        return NODE
    return MALIGNANT if _MALIGNANT_WORDS.search(text) else NODE


def read_seg_case(name: str, seg_path: Path, ct_paths: list[Path]) -> SiteCase:
    import highdicom as hd

    from inference.dicom_volume import load_series

    volume = load_series(ct_paths)
    seg = hd.seg.segread(seg_path)
    kinds = {int(d.SegmentNumber): segment_kind(d) for d in seg.SegmentSequence}
    node_kinds = {k: v for k, v in kinds.items() if v is not None}
    numbers = sorted(node_kinds)
    label = np.zeros(volume.shape, np.uint8)
    if not numbers:
        log.warning("%s: the SEG has no lymph-node segment; the case has no nodes", name)
    else:
        masks = seg_on_grid(seg, volume, numbers, name)
        for s, number in enumerate(numbers):
            np.maximum(label, np.where(masks[..., s], np.uint8(node_kinds[number]), np.uint8(0)), out=label)
    return SiteCase(name, volume.array, volume.affine, label, volume)


def seg_on_grid(seg, volume: Volume, numbers: list[int], name: str) -> np.ndarray:
    """Boolean (slices, rows, columns, len(numbers)) of the SEG's segments on the CT grid."""
    if (int(seg.Rows), int(seg.Columns)) != volume.shape[1:]:
        raise DatasetError(
            f"{name}: the SEG's frames are {seg.Rows}x{seg.Columns}, the CT's images "
            f"{volume.shape[1]}x{volume.shape[2]}; nodal reads SEGs drawn on the CT's own pixels"
        )
    refs = volume.slices
    try:
        if all(r.frame_number is None for r in refs):
            arr = seg.get_pixels_by_source_instance(
                [r.sop_instance_uid for r in refs], segment_numbers=numbers, combine_segments=False
            )
        else:  # one multi-frame CT instance
            arr = seg.get_pixels_by_source_frame(
                refs[0].sop_instance_uid,
                source_frame_numbers=[r.frame_number for r in refs],
                segment_numbers=numbers,
                combine_segments=False,
            )
        return _binary(arr)
    except (KeyError, ValueError, AttributeError, RuntimeError) as e:
        log.info("%s: frames not placed by source references (%s); placing them by position", name, e)
    return _by_position(seg, volume, numbers, name)


def _by_position(seg, volume: Volume, numbers: list[int], name: str) -> np.ndarray:
    """Place the SEG's planes on the CT grid by their Image Position (Patient)."""
    sv = seg.get_volume(segment_numbers=numbers, combine_segments=False, allow_missing_positions=True)
    arr = np.asarray(sv.array)
    if arr.ndim == 3:
        arr = arr[..., None]
    to_ct = np.linalg.inv(volume.affine) @ np.asarray(sv.affine, float)
    if not np.allclose(to_ct[:3, 1:3], np.eye(3)[:, 1:3], atol=1e-3):
        raise DatasetError(
            f"{name}: the SEG's pixel grid (spacing or orientation) differs from the CT's; "
            "nodal reads SEGs drawn on the CT's own pixels"
        )
    out = np.zeros((*volume.shape, len(numbers)), bool)
    for s in range(arr.shape[0]):
        kji = to_ct[:3, :3] @ np.array([s, 0.0, 0.0]) + to_ct[:3, 3]
        k, j, i = np.rint(kji).astype(int)
        if np.abs(kji - np.rint(kji)).max() > 0.1 or (j, i) != (0, 0) or not 0 <= k < volume.shape[0]:
            if arr[s].any():
                raise DatasetError(
                    f"{name}: a SEG plane lies at no CT slice (off by {kji.round(2).tolist()} voxels); "
                    "the SEG and the CT series do not match"
                )
            continue
        out[k] |= _binary(arr[s])
    return out


def _binary(arr) -> np.ndarray:
    """Segment membership: FRACTIONAL values (rescaled to [0, 1]) from one half up."""
    arr = np.asarray(arr)
    return arr >= 0.5 if arr.dtype.kind == "f" else arr > 0
