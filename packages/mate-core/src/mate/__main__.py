from mate.cli import main

raise SystemExit(main())
