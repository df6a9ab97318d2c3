"""The clinical AI gateway (issue 28): studies arrive by DICOM C-STORE, are assembled per series, routed by rules
to runs, predicted through ``Predictor`` behind the out-of-profile gate, and their results (DICOM SR TID 1500,
FHIR Bundle) delivered to PACS/EHR destinations with retries, from a durable SQLite queue, with an audit trail
and Prometheus metrics.

Modules: ``config`` (the YAML), ``queue`` (the durable queue), ``audit`` (JSON lines, UIDs hashed with the site
key), ``scp`` (the C-STORE/C-ECHO receiver), ``worker`` (assembly, routing, prediction, delivery), ``metrics``,
``service`` (both together until a signal), ``stow`` (STOW-RS on the serve app), ``drift`` and ``status_page``
(monitoring), ``shadow`` (change control: shadow versions, compare, promote) and ``ups`` (the AIW-I worklist:
a DIMSE UPS SCP). This layer sits between ``cli`` and ``serve``.
"""
