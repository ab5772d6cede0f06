from appendfs.cli import main

main()
