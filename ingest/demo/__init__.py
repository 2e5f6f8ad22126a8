"""The demo PACS: phantom studies served by a real Orthanc on loopback (``orthanc``, ``pacs``) and the
one-command pipeline demo on it (``quickstart``, run as ``python -m ingest.demo``)."""
