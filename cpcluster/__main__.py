from cpcluster.cli import main

main()
