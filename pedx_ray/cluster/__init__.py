"""Ray and Dask clusters: joining one from a training job (``connect``), starting a multi-node one on this
machine (``local``, ``python -m pedx_ray.cluster up``)."""
