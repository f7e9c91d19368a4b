from fundus_restore.cli import main

main()
