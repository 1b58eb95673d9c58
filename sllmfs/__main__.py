from sllmfs.cli import main

main()
