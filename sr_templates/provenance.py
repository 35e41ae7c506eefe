"""Who made a result: equipment, algorithm identification, series labels.

Every result object says that it comes from an algorithm (series description, Contributing
Equipment with the model version, algorithm identification), so that nobody mistakes it for
a physician's work.  Text here is ASCII only: the results inherit the source's Specific
Character Set, which may not be able to encode anything else.
"""

from __future__ import annotations

import highdicom as hd
from pydicom.uid import UID
from pydicom.valuerep import PersonName

from inference.findings import ModelInfo
from sr_templates import codes
from sr_templates.uids import device_uid

SEG_SERIES_NUMBER = 9901
SR_SERIES_NUMBER = 9902
SC_SERIES_NUMBER = 9903

SEG_SERIES_DESCRIPTION = "AI lymph nodes SEG (nodal, unverified)"
SR_SERIES_DESCRIPTION = "AI lymph node report (nodal, unverified)"
SC_SERIES_DESCRIPTION = "AI lymph node key images (nodal, unverified)"


def model_label(model: ModelInfo) -> str:
    """``"<model name> <model version>"`` for texts (at most 64 characters)."""
    return f"{model.name} {model.version}"[:64]


def content_creator_name(model: ModelInfo) -> PersonName:
    """Content Creator's Name of a result: the algorithm, ``<model name>^<model version>``."""
    return PersonName.from_named_components(family_name=model.name[:64], given_name=str(model.version)[:64])


def software_versions(model: ModelInfo) -> list[str]:
    """Software Versions: the nodal version, then the model name and version."""
    return [codes.SOFTWARE_VERSION, model_label(model)]


def algorithm_device_uid(model: ModelInfo) -> UID:
    return device_uid(model.name, model.version)


def contributing_equipment(model: ModelInfo) -> hd.ContributingEquipment:
    """The Contributing Equipment item of the algorithm (purpose: Processing Equipment)."""
    item = hd.ContributingEquipment(
        manufacturer=codes.MANUFACTURER,
        purpose_of_reference=codes.PROCESSING_EQUIPMENT,
        manufacturer_model_name=codes.MODEL_NAME,
        software_versions=software_versions(model),
        contribution_description=(f"Automatic lymph node detection by {model_label(model)}; not verified")[
            :1024
        ],
    )
    # The Device UID of the algorithm (IHE AIR) is carried by the SR's device observer
    # context (TID 1004) and in Device Serial Number; dicom3tools 2022 does not know
    # Device UID inside this sequence and would flag the objects as Standard Extended.
    item.DeviceSerialNumber = str(algorithm_device_uid(model))
    return item


def seg_algorithm_identification(model: ModelInfo) -> hd.AlgorithmIdentificationSequence:
    """Algorithm Identification Sequence of every segment (family: artificial intelligence)."""
    return hd.AlgorithmIdentificationSequence(
        name=model.name[:64],
        family=codes.ARTIFICIAL_INTELLIGENCE,
        version=str(model.version)[:64],
        source=codes.MANUFACTURER,
    )


def sr_algorithm_identification(model: ModelInfo) -> hd.sr.AlgorithmIdentification:
    """TID 4019 Algorithm Identification for SR measurement groups and measurements."""
    return hd.sr.AlgorithmIdentification(
        name=model.name[:64],
        version=str(model.version)[:64],
        manufacturer=codes.MANUFACTURER,
    )
