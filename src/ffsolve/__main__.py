from ffsolve.cli import main

raise SystemExit(main())
