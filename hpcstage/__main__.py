from hpcstage.cli import main

main()
