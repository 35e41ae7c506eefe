"""What nodal reads from an instance before it stores it: the UIDs that name its spool file
and the few attributes that the index and the routing rules need.

The values are read raw (pydicom's element reader, no `Dataset`, no value conversion) up
to Number of Frames (0028,0008): everything needed lies before it. The labels a person knows
a study by (accession number, patient name and ID) are read too; the index keeps the
patient's only when the status page shows them (`receive.indexer`). A multi-frame instance
(Enhanced CT) keeps slice thickness, kernel and its frames' positions and times in its
functional groups: it is read on up to its pixel data (a multi-frame CT's per-frame groups
take about 0.1 ms a frame to parse, on the receiving thread; another modality's are not
read). One decoder (`_header`) turns the raw values into an
`InstanceHeader`, whichever way the instance came:
- `read_dataset_header`: a dataset as a C-STORE brings it (no preamble, no file meta), on
  the receiving path of every instance;
- `read_header`: a Part 10 file (STOW-RS, files recovered from the spool).

A UID is accepted only by `check_uid`: digits and dots, at most 64 characters, so no UID
that becomes a file name can leave the spool.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from datetime import time as dt_time
from pathlib import Path

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_dataset, read_partial
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pydicom.valuerep import DA, DT, TM, PersonName

UID_PATTERN = r"[0-9]+(?:\.[0-9]+)*"  # the one UID pattern: header checks, spool log paths
UID_RE = re.compile(rf"^{UID_PATTERN}$")
DATETIME_RE = re.compile(r"^\d{12}(\d{2})?(\.\d{1,6})?([+-]\d{4})?$")  # DT down to minutes at least
TIME_RE = re.compile(r"^\d{2}(\d{2}){0,2}(\.\d{1,6})?$")  # TM: HH[MM[SS]][.F]

CHARSET = 0x00080005
IMAGE_TYPE = 0x00080008
SOP_CLASS = 0x00080016
SOP_INSTANCE = 0x00080018
ACQUISITION_DATE = 0x00080022
ACQUISITION_DATETIME = 0x0008002A
ACQUISITION_TIME = 0x00080032
ACCESSION = 0x00080050
MODALITY = 0x00080060
SERIES_DESCRIPTION = 0x0008103E
PATIENT_NAME = 0x00100010
PATIENT_ID = 0x00100020
SLICE_THICKNESS = 0x00180050
CONVOLUTION_KERNEL = 0x00181210
STUDY = 0x0020000D
SERIES = 0x0020000E
IMAGE_POSITION = 0x00200032
IMAGE_ORIENTATION = 0x00200037
FRAME_OF_REFERENCE = 0x00200052
FRAMES = 0x00280008  # the last tag read, except for multi-frame instances
HEADER_TAGS = (
    CHARSET,
    IMAGE_TYPE,
    SOP_CLASS,
    SOP_INSTANCE,
    ACQUISITION_DATE,
    ACQUISITION_DATETIME,
    ACQUISITION_TIME,
    ACCESSION,
    MODALITY,
    SERIES_DESCRIPTION,
    PATIENT_NAME,
    PATIENT_ID,
    SLICE_THICKNESS,
    CONVOLUTION_KERNEL,
    STUDY,
    SERIES,
    IMAGE_POSITION,
    IMAGE_ORIENTATION,
    FRAME_OF_REFERENCE,
    FRAMES,
)
_WANTED = frozenset(HEADER_TAGS)
SHARED_FUNCTIONAL_GROUPS = 0x52009229
PER_FRAME_FUNCTIONAL_GROUPS = 0x52009230
PIXEL_DATA_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)

Values = dict[int, bytes | None]  # raw values by tag


class InvalidInstanceError(ValueError):
    """The instance cannot be stored: unreadable, or a UID is missing or malformed."""


def check_uid(value: object, what: str) -> str:
    """Return `value` as a UID string, or raise InvalidInstanceError naming `what`."""
    uid = str(value or "").rstrip("\0 ")
    if not uid:
        raise InvalidInstanceError(f"{what} is missing")
    if len(uid) > 64:
        raise InvalidInstanceError(f"{what} is longer than 64 characters ({len(uid)})")
    if not UID_RE.match(uid):
        raise InvalidInstanceError(f"{what} is not a UID (only digits and dots are allowed)")
    return uid


@dataclass(frozen=True)
class InstanceHeader:
    """What the index and the routing rules need from one instance."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    transfer_syntax_uid: str
    modality: str = ""
    image_type: tuple[str, ...] = ()
    slice_thickness_mm: float | None = None
    series_description: str = ""
    frames: int = 1
    source_ae: str = ""  # file meta Source Application Entity Title (the C-STORE caller)
    accession_number: str = ""
    patient_name: str = ""  # as text: "Family^Given", component groups joined by "="
    patient_id: str = ""
    # which scan the instance is a reconstruction of (`completion.reconstructions`)
    frame_of_reference_uid: str = ""  # "" when absent or malformed
    acquired: tuple[float, float] | None = None  # first and last acquisition time of its data, s
    kernel: str = ""  # Convolution Kernel, values joined by "\"
    extent_mm: tuple[float, float] | None = None  # lowest and highest slice position along the normal


def read_dataset_header(dataset: bytes, transfer_syntax_uid: str, source_ae: str = "") -> InstanceHeader:
    """Parse the header of a dataset as a C-STORE brings it (no preamble, no file meta),
    encoded in `transfer_syntax_uid`; the same result as `read_header` on its Part 10 file."""
    try:
        ts = UID(check_uid(transfer_syntax_uid, "Transfer Syntax UID"))
        implicit, little = ts.is_implicit_VR, ts.is_little_endian
        if ts.is_deflated:
            dataset = zlib.decompress(dataset, -zlib.MAX_WBITS)
        stream = io.BytesIO(dataset)
        values = _collect(data_element_generator(stream, implicit, little, stop_when=_past_header))
        groups = None
        if wanted := _functional_groups(values):
            stream.seek(0)
            groups = read_dataset(stream, implicit, little, stop_when=_at_pixel_data, specific_tags=wanted)
    except InvalidInstanceError:
        raise
    except Exception as e:
        raise InvalidInstanceError(f"not a readable DICOM dataset: {type(e).__name__}") from None
    return _header(values, str(ts), groups, source_ae.strip()[:16])


def read_header(source: bytes | Path) -> InstanceHeader:
    """Parse the header of a Part 10 file (bytes or a path); pixel data is not read."""
    try:
        with _open(source) as stream:
            ds = read_partial(stream, stop_when=_past_header, specific_tags=list(HEADER_TAGS))
            values = _collect(ds.get_item(tag) for tag in HEADER_TAGS if tag in ds)
            groups = None
            if wanted := _functional_groups(values):
                stream.seek(0)
                groups = read_partial(stream, stop_when=_at_pixel_data, specific_tags=wanted)
        ts = str(ds.file_meta.get("TransferSyntaxUID", ""))
        source_ae = str(ds.file_meta.get("SourceApplicationEntityTitle", "") or "").strip()[:16]
    except Exception as e:
        raise InvalidInstanceError(f"not a readable DICOM Part 10 file: {type(e).__name__}") from None
    return _header(values, ts, groups, source_ae)


def _collect(elements: Iterable) -> Values:
    return {tag: _raw(e.value) for e in elements if (tag := int(e.tag)) in _WANTED}


def _raw(value) -> bytes | None:
    """The value as read; a `Dataset` that pydicom read holds Specific Character Set
    already decoded (a string, or a list of them)."""
    if value is None or isinstance(value, bytes):
        return value
    return "\\".join([value] if isinstance(value, str) else map(str, value)).encode("latin-1", "replace")


def _past_header(tag, vr, length) -> bool:
    return int(tag) > FRAMES


def _at_pixel_data(tag, vr, length) -> bool:
    return tag in PIXEL_DATA_TAGS


def _open(source: bytes | Path):
    return io.BytesIO(source) if isinstance(source, bytes) else open(source, "rb")


def _text(raw: bytes | None) -> str:
    """A value of a text VR that holds only the default repertoire (UI, CS, DS, IS)."""
    return raw.decode("latin-1").strip("\0 ") if raw else ""


def _frames(values: Values) -> int:
    text = _text(values.get(FRAMES))
    if not text:
        return 1
    try:
        return max(1, int(text))
    except ValueError:
        number = float(text)  # an IS written as "3.0"; anything else is malformed
        if not number.is_integer():
            raise
        return max(1, int(number))


def _functional_groups(values: Values) -> list[int]:
    """The functional groups a multi-frame instance is read on for: a CT's shared and
    per-frame groups (thickness, kernel, its frames' positions); another's shared groups
    where its thickness is not at the top (a SEG's frames are not read)."""
    try:
        if _frames(values) == 1:
            return []
    except ValueError:
        return []  # reported by `_header`
    if _text(values.get(MODALITY)) == "CT":
        return [SHARED_FUNCTIONAL_GROUPS, PER_FRAME_FUNCTIONAL_GROUPS]
    return [] if _text(values.get(SLICE_THICKNESS)) else [SHARED_FUNCTIONAL_GROUPS]


def _header(
    values: Values, transfer_syntax_uid: str, groups: Dataset | None, source_ae: str
) -> InstanceHeader:
    try:
        charset = [v.strip() for v in _text(values.get(CHARSET)).split("\\")]
        encodings = convert_encodings(charset if any(charset) else None)
        image_type = _text(values.get(IMAGE_TYPE))
        return InstanceHeader(
            sop_class_uid=check_uid(_text(values.get(SOP_CLASS)), "SOP Class UID"),
            sop_instance_uid=check_uid(_text(values.get(SOP_INSTANCE)), "SOP Instance UID"),
            study_instance_uid=check_uid(_text(values.get(STUDY)), "Study Instance UID"),
            series_instance_uid=check_uid(_text(values.get(SERIES)), "Series Instance UID"),
            transfer_syntax_uid=check_uid(transfer_syntax_uid, "Transfer Syntax UID"),
            modality=_text(values.get(MODALITY))[:16],
            image_type=tuple(v.strip().upper() for v in image_type.split("\\"))[:8] if image_type else (),
            slice_thickness_mm=_thickness(_text(values.get(SLICE_THICKNESS)), groups),
            series_description=_decoded(values.get(SERIES_DESCRIPTION), encodings)[:64],
            frames=_frames(values),
            source_ae=source_ae,
            accession_number=_decoded(values.get(ACCESSION), encodings)[:16],
            patient_name=_person_name(values.get(PATIENT_NAME), encodings),
            patient_id=_decoded(values.get(PATIENT_ID), encodings)[:64],
            frame_of_reference_uid=_optional_uid(values.get(FRAME_OF_REFERENCE)),
            acquired=_acquired(values, groups),
            kernel=(_decoded(values.get(CONVOLUTION_KERNEL), encodings) or _group_kernel(groups))[:64],
            extent_mm=_extent(values, groups),
        )
    except InvalidInstanceError:
        raise
    except Exception as e:  # a malformed value (e.g. a non-numeric IS)
        raise InvalidInstanceError(f"malformed header: {type(e).__name__}") from None


def _decoded(raw: bytes | None, encodings: list[str]) -> str:
    """A value of a text VR in the instance's character set; plain ASCII needs no codec."""
    if not raw:
        return ""
    text = raw.decode("ascii") if raw.isascii() and 0x1B not in raw else decode_bytes(raw, encodings, set())
    return text.strip("\0 ")


def _person_name(raw: bytes | None, encodings: list[str]) -> str:
    if not raw:
        return ""
    if raw.isascii() and 0x1B not in raw:
        return raw.decode("ascii").strip("\0 ")
    return str(PersonName(raw, encodings)).strip("\0 ")


def _optional_uid(raw: bytes | None) -> str:
    """A UID that only informs a choice: malformed reads as absent, never refuses the instance."""
    try:
        return check_uid(_text(raw), "UID")
    except InvalidInstanceError:
        return ""


def _extent(values: Values, groups: Dataset | None) -> tuple[float, float] | None:
    """The lowest and highest slice position along the normal of the image orientation: a
    single-frame instance's one position; a multi-frame one's frames' (its per-frame
    functional groups, the orientation shared or the first frame's; without per-frame
    groups, the one position at the top). None when absent or malformed: it only informs a
    choice (`completion.reconstructions`)."""
    if groups is None or "PerFrameFunctionalGroupsSequence" not in groups:
        position, orientation = (
            _text(values.get(tag)).split("\\") for tag in (IMAGE_POSITION, IMAGE_ORIENTATION)
        )
        along = _along(position, orientation)
        return None if along is None else (along, along)
    plane = _group_item(groups, "PlaneOrientationSequence")
    if plane is None:
        return None
    try:
        cosines = plane.ImageOrientationPatient
        frames = groups.PerFrameFunctionalGroupsSequence
        positions = [_along(f.PlanePositionSequence[0].ImagePositionPatient, cosines) for f in frames]
    except (AttributeError, IndexError, KeyError, TypeError):
        return None
    found = [p for p in positions if p is not None]
    return (min(found), max(found)) if found and len(found) == len(positions) else None


def _along(position_values: Sequence, orientation_values: Sequence) -> float | None:
    """Image Position (Patient) along the normal of Image Orientation (Patient): where the
    slice lies, comparable between series of one orientation; None when absent or malformed."""
    try:
        position = [float(v) for v in position_values]
        cosines = [float(v) for v in orientation_values]
    except (ValueError, TypeError):
        return None
    if len(position) != 3 or len(cosines) != 6:
        return None
    (rx, ry, rz), (cx, cy, cz) = cosines[:3], cosines[3:]
    normal = (ry * cz - rz * cy, rz * cx - rx * cz, rx * cy - ry * cx)
    length = math.sqrt(sum(n * n for n in normal))
    along = sum(p * n for p, n in zip(position, normal, strict=True))
    return along / length if math.isfinite(along) and length > 0.5 else None


def _group_kernel(groups: Dataset | None) -> str:
    """Convolution Kernel of an Enhanced CT: its CT Reconstruction functional group."""
    return "" if groups is None else _in_groups(groups, "CTReconstructionSequence", "ConvolutionKernel")


def _group_item(groups: Dataset, group: str, keyword: str | None = None) -> Dataset | None:
    """The item of a functional group (holding `keyword`, where given) in the shared groups,
    or else in the first frame's; None when neither holds it."""
    for name in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        try:
            item = getattr(groups, name)[0][group].value[0]
        except (AttributeError, IndexError, KeyError, TypeError):
            continue
        if keyword is None or item.get(keyword) not in (None, ""):
            return item
    return None


def _in_groups(groups: Dataset, group: str, keyword: str) -> str:
    """A value of a functional group, shared or else the first frame's, as text ("" when
    neither holds it)."""
    item = _group_item(groups, group, keyword)
    if item is None:
        return ""
    value = item[keyword].value
    return "\\".join(map(str, value)) if isinstance(value, MultiValue) else str(value)


def _acquired(values: Values, groups: Dataset | None) -> tuple[float, float] | None:
    """When the instance's data were acquired, first and last, in seconds of the scanner's
    clock (any UTC offset is left out: series of one scanner are compared, and one may carry
    an offset that another lacks): a multi-frame instance's frames' Frame Acquisition
    DateTime where every frame says it, else Acquisition DateTime, else Acquisition Date and
    Time (the time alone counts from midnight); None when absent or malformed (it only
    informs a choice, `completion.reconstructions`)."""
    if groups is not None and "PerFrameFunctionalGroupsSequence" in groups:
        try:
            frames = [
                _datetime(str(f.FrameContentSequence[0].FrameAcquisitionDateTime))
                for f in groups.PerFrameFunctionalGroupsSequence
            ]
        except (AttributeError, IndexError, KeyError, TypeError):
            frames = []
        found = [t for t in frames if t is not None]
        if found and len(found) == len(frames):
            return min(found), max(found)
    t = _acquired_at(values)
    return None if t is None else (t, t)


def _datetime(text: str) -> float | None:
    """A DT down to minutes at least, in seconds (its UTC offset left out); None otherwise."""
    if not DATETIME_RE.match(text):
        return None
    try:
        return DT(text).replace(tzinfo=UTC).timestamp()
    except (ValueError, TypeError, AttributeError):
        return None


def _acquired_at(values: Values) -> float | None:
    """Acquisition DateTime, else Acquisition Date and Time, in seconds (`_acquired`)."""
    at = _datetime(_text(values.get(ACQUISITION_DATETIME)))
    if at is not None:
        return at
    # absent or malformed: the Date and Time, if any, say it
    time_text = _text(values.get(ACQUISITION_TIME)).replace(":", "")  # "10:15:30": before 1993
    if not TIME_RE.match(time_text):
        return None
    try:
        t = TM(time_text)
        seconds = t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6
        date_text = _text(values.get(ACQUISITION_DATE))
        if date_text:
            seconds += datetime.combine(DA(date_text), dt_time(), UTC).timestamp()
        return seconds
    except (ValueError, TypeError, AttributeError):
        return None


def _thickness(text: str, groups: Dataset | None) -> float | None:
    """Slice Thickness, or the one in the functional groups, shared or the first frame's
    (Enhanced CT)."""
    if not text and groups is not None:
        text = _in_groups(groups, "PixelMeasuresSequence", "SliceThickness")
    try:
        return float(text)
    except ValueError:
        return None
