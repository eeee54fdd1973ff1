from fastbert.cli import main

raise SystemExit(main())
