"""python -m jobs VERB ... == gradcon VERB ... (what `ray job submit` runs on a cluster)."""
from jobs.cli import main

raise SystemExit(main())
