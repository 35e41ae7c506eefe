"""The status page at `/`: what nodal received, did and sent (dicom_node.status.router)."""
