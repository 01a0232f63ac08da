"""The DICOM screening node: studies in by C-STORE or STOW-RS, a durable job store, an audit trail.

A layer above ``serve``: the node is the HTTP screening service plus a Storage SCP, a job store and the
screening worker that drains it (docs/architecture.md, docs/dicom-conformance.md).
"""
