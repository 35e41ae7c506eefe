"""Every coded concept and product constant the result objects use, defined once.

Schemes: SNOMED CT as ``SCT`` (never the retired ``SRT``), DICOM ``DCM``, LOINC ``LN`` and
UCUM units.  Meanings follow the DICOM content mapping resource (PS3.16) so that validators
that know the context groups find nothing to complain about.

Private concepts (scheme ``99NODAL``) are used only where DICOM has no concept (a size
class such as RECIST "measurable", short axis >= 15 mm); an SR that uses one carries a
Coding Scheme Identification item for it (:func:`private_coding_scheme`).
"""

from __future__ import annotations

import importlib.metadata
import re

from highdicom.coding_schemes import CodingSchemeIdentificationItem
from pydicom.sr.coding import Code

# --------------------------------------------------------------------------------------
# Product identity (Manufacturer, Manufacturer's Model Name, Software Versions)
# --------------------------------------------------------------------------------------

MANUFACTURER = "nodal project"
MODEL_NAME = "nodal"
DISTRIBUTION = "nodal"
UNKNOWN_VERSION = "0+unknown"


def software_version() -> str:
    """Version of the installed ``nodal`` distribution (``0+unknown`` when not installed)."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN_VERSION


SOFTWARE_VERSION = software_version()

# --------------------------------------------------------------------------------------
# Segmentation (SEG) and findings
# --------------------------------------------------------------------------------------

ANATOMICAL_STRUCTURE = Code("91723000", "SCT", "Anatomical Structure")  # CID 7150
MORPHOLOGICALLY_ABNORMAL_STRUCTURE = Code("49755003", "SCT", "Morphologically Abnormal Structure")
LYMPH_NODE = Code("59441001", "SCT", "Lymph Node")  # CID 7151 / CID 7600
ARTIFICIAL_INTELLIGENCE = Code("123110", "DCM", "Artificial Intelligence")  # CID 7162
FINDING = Code("121071", "DCM", "Finding")
FINDING_SITE = Code("363698007", "SCT", "Finding Site")

# --------------------------------------------------------------------------------------
# Measurements (TID 300 / TID 1419) and units (UCUM)
# --------------------------------------------------------------------------------------

SHORT_AXIS = Code("103340004", "SCT", "Short Axis")  # CID 7470
LONG_AXIS = Code("103339001", "SCT", "Long Axis")  # CID 7470
VOLUME = Code("118565006", "SCT", "Volume")  # CID 7472
ATTENUATION_COEFFICIENT = Code("112031", "DCM", "Attenuation Coefficient")
MEAN = Code("373098007", "SCT", "Mean")  # CID 7464 derivation modifier
PROBABILITY_OF_CANCER = Code("111047", "DCM", "Probability of cancer")  # CID 6048

UCUM_MM = Code("mm", "UCUM", "millimeter")
UCUM_MM3 = Code("mm3", "UCUM", "cubic millimeter")
UCUM_HU = Code("[hnsf'U]", "UCUM", "Hounsfield unit")
UCUM_NO_UNITS = Code("1", "UCUM", "no units")
UCUM_PERCENT = Code("%", "UCUM", "percent")

# --------------------------------------------------------------------------------------
# Qualitative evaluations
# --------------------------------------------------------------------------------------

#: Question of the malignant/benign evaluation ("has interpretation": malignant | benign).
MALIGNANCY_INTERPRETATION = Code("363713009", "SCT", "Has interpretation")
MALIGNANT = Code("21594007", "SCT", "Malignant")
BENIGN = Code("30807003", "SCT", "Benign")
#: Probability at or above which a node is called malignant.
MALIGNANCY_THRESHOLD = 0.5

#: No-findings report: "Finding: lymph node; Presence of property: absent".
PRESENCE_OF_PROPERTY = Code("121052", "DCM", "Presence of property")
ABSENT = Code("272519000", "SCT", "Absent")  # CID 240

#: A node's evaluations in words (TEXT), which viewers that show no coded value display.
COMMENT = Code("121106", "DCM", "Comment")

NORMAL = Code("17621005", "SCT", "Normal")
ENLARGED = Code("260376009", "SCT", "Enlarged")

# --------------------------------------------------------------------------------------
# Size categories; private concepts only where no DICOM concept exists
# --------------------------------------------------------------------------------------

PRIVATE_SCHEME = "99NODAL"

#: Question of the size evaluation (the rule-based short-axis class, RECIST 1.1 style).
SIZE_CATEGORY = Code("112025", "DCM", "Size Descriptor")

#: RECIST 1.1 "pathological target" node (short axis >= 15 mm): no DICOM concept.
TARGET_NODE = Code("LN-TARGET", PRIVATE_SCHEME, "Pathological target node (short axis >= 15 mm)")


def size_category_code(category: str) -> Code:
    """The coded value of a rule-based size category of `inference.rules`.

    ``"normal (<10 mm)"`` -> SCT Normal; ``"pathological non-target (10-15 mm)"`` (or
    "enlarged") -> SCT Enlarged; ``"pathological target (>=15 mm)"`` (or "measurable") ->
    the private :data:`TARGET_NODE`.  Any other category gets a ``99NODAL`` code whose
    value is the category in upper case (at most 16 characters, the limit of Code Value)
    and whose meaning is the category itself.
    """
    key = " ".join(category.lower().split())
    if not key:
        raise ValueError("size category is empty; expected e.g. 'normal (<10 mm)'")
    if key.startswith(("normal", "small")):
        return NORMAL
    if "non-target" in key or "nontarget" in key or key.startswith(("enlarged", "borderline")):
        return ENLARGED
    if "target" in key or key.startswith("measurable"):
        return TARGET_NODE
    value = re.sub(r"[^A-Z0-9]+", "-", key.upper()).strip("-")[:16].strip("-") or "UNKNOWN"
    return Code(value, PRIVATE_SCHEME, category.strip()[:64])


def uses_private_scheme(code: Code) -> bool:
    return code.scheme_designator == PRIVATE_SCHEME


def private_coding_scheme() -> CodingSchemeIdentificationItem:
    """A Coding Scheme Identification Sequence item that declares ``99NODAL``."""
    return CodingSchemeIdentificationItem(
        designator=PRIVATE_SCHEME,
        name="nodal private concepts",
        responsible_organization=MANUFACTURER,
    )


# --------------------------------------------------------------------------------------
# Follow-up: time points (TID 1502), changes, RECIST 1.1 roles and responses
# --------------------------------------------------------------------------------------

PRESENT = Code("52101004", "SCT", "Present")  # CID 240, beside ABSENT
#: Derivation (DCM 121401) of a NUM that is the relative change since the prior time point
#: (CID 12303 Measurement Type); its unit is UCUM_PERCENT.
FRACTIONAL_CHANGE = Code("125314", "DCM", "Fractional Change")
#: a node's RECIST role at baseline (CID 6145)
BASELINE_CATEGORY = Code("112016", "DCM", "Baseline Category")
TARGET_AT_BASELINE = Code("112074", "DCM", "Target Lesion at Baseline")
NON_TARGET_AT_BASELINE = Code("112075", "DCM", "Non-Target Lesion at Baseline")
NON_LESION_AT_BASELINE = Code("112076", "DCM", "Non-Lesion at Baseline")
BASELINE_ROLES = {
    "target": TARGET_AT_BASELINE,
    "non-target": NON_TARGET_AT_BASELINE,
    "normal": NON_LESION_AT_BASELINE,
}
#: the study's response: method (CID 6147) and target / non-target responses (CID 6144)
RESPONSE_EVALUATION_METHOD = Code("112021", "DCM", "Response Evaluation Method")
RECIST_1_1 = Code("126081", "DCM", "RECIST 1.1")
CURRENT_RESPONSE = Code("112048", "DCM", "Current Response")
TARGET_RESPONSES = {
    "CR": Code("112041", "DCM", "Target Lesion Complete Response"),
    "PR": Code("112042", "DCM", "Target Lesion Partial Response"),
    "PD": Code("112043", "DCM", "Target Lesion Progressive Disease"),
    "SD": Code("112044", "DCM", "Target Lesion Stable Disease"),
}
NON_TARGET_RESPONSES = {
    "CR": Code("112045", "DCM", "Non-Target Lesion Complete Response"),
    "non-CR/non-PD": Code("112046", "DCM", "Non-Target Lesion Incomplete Response or Stable Disease"),
    "PD": Code("112047", "DCM", "Non-Target Lesion Progressive Disease"),
}

# --------------------------------------------------------------------------------------
# Report structure, provenance
# --------------------------------------------------------------------------------------

IMAGING_MEASUREMENT_REPORT = Code("126000", "DCM", "Imaging Measurement Report")  # CID 7021
#: TID 1500 row 12: the report's container of study-level evaluations (the follow-up response)
QUALITATIVE_EVALUATIONS = Code("C0034375", "UMLS", "Qualitative Evaluations")
CT_UNSPECIFIED_BODY_REGION = Code("25045-6", "LN", "CT unspecified body region")  # CID 100
DEVICE = Code("121007", "DCM", "Device")  # CID 270 observer type
PROCESSING_EQUIPMENT = Code("109102", "DCM", "Processing Equipment")

__all__ = [
    "ABSENT",
    "ANATOMICAL_STRUCTURE",
    "ARTIFICIAL_INTELLIGENCE",
    "ATTENUATION_COEFFICIENT",
    "BASELINE_CATEGORY",
    "BASELINE_ROLES",
    "BENIGN",
    "COMMENT",
    "CT_UNSPECIFIED_BODY_REGION",
    "CURRENT_RESPONSE",
    "DEVICE",
    "ENLARGED",
    "FINDING",
    "FINDING_SITE",
    "FRACTIONAL_CHANGE",
    "IMAGING_MEASUREMENT_REPORT",
    "LONG_AXIS",
    "LYMPH_NODE",
    "MALIGNANCY_INTERPRETATION",
    "MALIGNANCY_THRESHOLD",
    "MALIGNANT",
    "MANUFACTURER",
    "MEAN",
    "MODEL_NAME",
    "MORPHOLOGICALLY_ABNORMAL_STRUCTURE",
    "NON_LESION_AT_BASELINE",
    "NON_TARGET_AT_BASELINE",
    "NON_TARGET_RESPONSES",
    "NORMAL",
    "PRESENCE_OF_PROPERTY",
    "PRESENT",
    "PRIVATE_SCHEME",
    "PROBABILITY_OF_CANCER",
    "PROCESSING_EQUIPMENT",
    "QUALITATIVE_EVALUATIONS",
    "RECIST_1_1",
    "RESPONSE_EVALUATION_METHOD",
    "SHORT_AXIS",
    "SIZE_CATEGORY",
    "SOFTWARE_VERSION",
    "TARGET_AT_BASELINE",
    "TARGET_NODE",
    "TARGET_RESPONSES",
    "UCUM_HU",
    "UCUM_MM",
    "UCUM_MM3",
    "UCUM_NO_UNITS",
    "UCUM_PERCENT",
    "VOLUME",
    "private_coding_scheme",
    "size_category_code",
    "software_version",
    "uses_private_scheme",
]
