"""Alembic migrations of the index (`nodal db upgrade`); see dicom_node.index.schema."""
