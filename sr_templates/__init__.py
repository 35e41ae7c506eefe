"""Result objects radiologists see: DICOM SEG, TID 1500 SR and labelled result images.

Give it the source CT datasets and the `inference.findings.StudyFindings` of a series::

    from sr_templates import write_results
    paths = write_results(datasets, study_findings, out_dir)

This package never imports torch, monai or dicom_node.
"""

from sr_templates.reader import is_nodal_sr, read_prior_nodes, read_prior_study
from sr_templates.write import ResultObjects, build_results, write_results

__all__ = [
    "ResultObjects",
    "build_results",
    "is_nodal_sr",
    "read_prior_nodes",
    "read_prior_study",
    "write_results",
]
