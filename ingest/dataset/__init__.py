"""The dataset core: spool → ``catalog`` (Parquet) → ``labels`` (header rules, site codes) against the
``taxonomy`` (7/30/68 views, a data file in ``data/``) → ``balance`` (splits) → ``shards`` (WebDataset)."""
