"""Ray Serve application serving the PedX-Ray models (see deploy/app.py)."""
