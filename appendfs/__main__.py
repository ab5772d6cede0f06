from appendfs.runtime import main

main()
