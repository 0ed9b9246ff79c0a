from infercomp.cli import main

main()
