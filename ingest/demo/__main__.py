from ingest.demo.quickstart import main

raise SystemExit(main())
