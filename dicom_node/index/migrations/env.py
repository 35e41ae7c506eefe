"""Alembic environment: runs on the connection that dicom_node.index.schema hands over."""

from alembic import context

from dicom_node.index.db import Base

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
