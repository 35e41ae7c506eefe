"""The tests mirror the source tree: `node/<subpackage>/` for `dicom_node`, `inference/`,
`sr_templates/`, and `peers/` for the tests against running peers (a `nodal serve`
subprocess, Orthanc, Prometheus, PostgreSQL, Redis, chromium). Shared builders live in
the `tests.helpers` package; fixtures live in the `conftest.py` of the level that uses
them. Every folder is a package, so a test module's name never clashes with another's or
with the packages under test.
"""
