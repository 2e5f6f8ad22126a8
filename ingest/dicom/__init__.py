"""DICOM networking: the PACS-facing side of ingest.

- ``scu``: C-ECHO, C-FIND, C-MOVE and C-GET against a PACS (``python -m ingest scu``).
- ``scp``: the Storage SCP that receives C-MOVE sub-operations and pushed studies
  (``python -m ingest scp``).
- ``upper_layer``, ``acceptor``, ``requestor``: the fast DICOM upper layer (PS3.8) that the C-MOVE
  destination and C-GET use for bulk transfer (``--transport fast``, the default); pynetdicom carries
  everything else, and those too with ``--transport pynetdicom``, the fallback for a PACS that does
  not interoperate with the fast one.
"""
